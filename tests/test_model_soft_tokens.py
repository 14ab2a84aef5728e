"""Soft weight tokens: the objective weights enter a weight-conditioned policy as embeddings."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.models.generate import generate
from pro_jax.models.transformer import soft_weight_delta

BASE = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=64)
SOFT = BASE.replace(weight_tokens=2, num_weights=3, weight_token_id=7)


@pytest.fixture(scope="module")
def soft():
  model = Transformer(SOFT)
  v = init_variables(model, jax.random.PRNGKey(0))
  return model, v


def test_delta_matches_hand_computation():
  r = np.random.default_rng(0)
  W = r.normal(size=(3, 2, 32)).astype(np.float32)
  w = r.dirichlet(np.ones(3), size=2).astype(np.float32)
  tokens = np.array([[0, 0, 7, 5, 7, 7], [7, 4, 3, 7, 2, 1]], np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)
  tokens_padded = tokens.copy()
  tokens_padded[0, 0] = 7  # a placeholder id in the padding does not count
  d = np.asarray(soft_weight_delta(SOFT, jnp.asarray(tokens_padded), jnp.asarray(mask), jnp.asarray(w), jnp.asarray(W)))
  expect = np.zeros((2, 6, 32), np.float32)
  expect[0, 2] = w[0] @ W[:, 0]
  expect[0, 4] = w[0] @ W[:, 1]  # the third occurrence (slot 5) is beyond weight_tokens = 2: nothing
  expect[1, 0] = w[1] @ W[:, 0]
  expect[1, 3] = w[1] @ W[:, 1]
  np.testing.assert_allclose(d, expect, atol=1e-6)


def test_without_weights_it_is_the_base_model(soft):
  model, v = soft
  base_params = {k: x for k, x in v["params"].items() if k != "weight_embed"}
  tokens = jnp.array([[1, 7, 9, 7, 3]], jnp.int32)
  a = model.apply(v, tokens).logits
  b = Transformer(BASE).apply({"params": base_params}, tokens).logits
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_placeholder_equals_a_shifted_embedding_row(soft):
  """With one placeholder, adding w . W[:, 0] is the same as moving that token's embedding row."""
  model, v = soft
  w = jnp.array([[0.2, 0.5, 0.3]], jnp.float32)
  tokens = jnp.array([[1, 4, 7, 9, 3]], jnp.int32)
  a = model.apply(v, tokens, weights_BxK=w).logits
  params = dict(v["params"])
  row = params["embed"][7] + w[0] @ params["weight_embed"][:, 0]
  params["embed"] = params["embed"].at[7].set(row)
  base_params = {k: x for k, x in params.items() if k != "weight_embed"}
  b = Transformer(BASE).apply({"params": base_params}, tokens).logits
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # and the weights matter after the placeholder only (causality)
  c = model.apply(v, tokens, weights_BxK=jnp.array([[1.0, 0.0, 0.0]])).logits
  np.testing.assert_allclose(np.asarray(a[:, :2]), np.asarray(c[:, :2]), atol=1e-6)
  assert float(jnp.abs(a[:, 2:] - c[:, 2:]).max()) > 1e-4


def test_generate_with_weights_matches_cache_free_greedy(soft):
  model, v = soft
  v = jax.tree.map(lambda x: x * 3.0, v)  # sharper logits: no near-ties in the argmax
  prompts = jnp.array([[0, 1, 7, 7, 5], [1, 4, 7, 7, 6]], jnp.int32)
  mask = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  w = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], jnp.float32)
  out = generate(model, v, prompts, mask, max_new_tokens=4, greedy=True, eos_token_id=[], weights_BxK=w)
  seq, m = prompts, mask
  for i in range(4):
    logits = model.apply(v, seq, m, weights_BxK=w).logits[:, -1]
    nxt = jnp.argmax(logits, -1)
    assert np.array_equal(np.asarray(nxt), np.asarray(out.tokens_BxN[:, i])), i
    seq = jnp.concatenate([seq, nxt[:, None].astype(jnp.int32)], 1)
    m = jnp.concatenate([m, jnp.ones((2, 1), jnp.int32)], 1)
  with pytest.raises(ValueError, match="soft weight tokens"):
    generate(model, v, prompts, mask, max_new_tokens=2, greedy=True)


def test_config_validation():
  with pytest.raises(ValueError, match="num_weights"):
    BASE.replace(weight_tokens=2)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    BASE.replace(weight_tokens=1, num_weights=2, weight_token_id=99)
