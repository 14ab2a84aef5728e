"""LoRA: zero-init identity, merged == unmerged, dropout gating, LoRA-only optimizer, parameter count."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pro_jax.models import LoRAConfig, ModelConfig, Transformer, init_variables
from pro_jax.models.config import GPT2_LORA_TARGETS, LLAMA_LORA_TARGETS
from pro_jax.models.generate import generate
from pro_jax.models.lora import (combine_variables, init_lora, lora_only, lora_param_count, lora_trainable_mask,
                                 merge_lora, merged_config, split_variables)

D, H, KV, HD, M, V, LAYERS, R = 32, 4, 2, 8, 48, 40, 2, 4
LLAMA = ModelConfig(vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=H, n_kv_heads=KV, mlp_dim=M,
                    lora=LoRAConfig(rank=R, alpha=8.0, targets=LLAMA_LORA_TARGETS))
GPT2 = ModelConfig(vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=H, mlp_dim=M, arch="gpt2", max_seq_len=32,
                   lora=LoRAConfig(rank=R, alpha=8.0, targets=GPT2_LORA_TARGETS))
CONFIGS = {"llama": LLAMA, "gpt2": GPT2}


@functools.lru_cache(maxsize=None)
def _variables(config, seed=0):
  model = Transformer(config)
  return jax.jit(functools.partial(init_variables, model))(jax.random.key(seed))


def _randomize_b(lora, seed=1, std=0.3):
  """Non-zero B everywhere (a fresh adapter has B = 0)."""
  leaves, treedef = jax.tree.flatten_with_path(lora)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.normal(k, x.shape, x.dtype) * std if jax.tree_util.keystr(p).endswith("['b']") else x
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def _batch(B=3, L=9, seed=2):
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, V)
  mask = jnp.ones((B, L), jnp.int32).at[1, :3].set(0)  # one left-padded row
  return tokens, mask


@functools.lru_cache(maxsize=None)
def _logits_fn(config):
  return jax.jit(lambda v, t, m: Transformer(config).apply(v, t, m).logits)


def _logits(config, variables, tokens, mask):
  return np.asarray(_logits_fn(config)(variables, tokens, mask))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_fresh_lora_equals_base_exactly(arch, monkeypatch):
  """B = 0: the LoRA model's logits equal the base model's bit for bit when both programs run the
  layers as one scanned body; unrolled (the default for shallow stacks), XLA fuses the two programs'
  base matmuls differently, which moves float32 results by rounding only (checked to 1e-6)."""
  from pro_jax.models import transformer

  config = CONFIGS[arch]
  variables = _variables(config)
  # init_lora on one arch (a compile each); the fresh "lora" collection of init_variables on the other.
  lora = init_lora(Transformer(config), jax.random.key(7)) if arch == "llama" else variables["lora"]
  assert jax.tree.structure(lora) == jax.tree.structure(variables["lora"])
  assert all(np.all(np.asarray(x) == 0) for p, x in jax.tree.flatten_with_path(lora)[0]
             if jax.tree_util.keystr(p).endswith("['b']"))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(lora))  # A is random
  tokens, mask = _batch()
  base = _logits(merged_config(config), {"params": variables["params"]}, tokens, mask)
  with_lora = _logits(config, {"params": variables["params"], "lora": lora}, tokens, mask)
  np.testing.assert_allclose(with_lora, base, rtol=0, atol=1e-6)
  monkeypatch.setattr(transformer, "UNROLL_MAX_LAYERS", 0)
  assert transformer.scans_layers(config)
  base = np.asarray(_logits_fn.__wrapped__(merged_config(config))({"params": variables["params"]}, tokens, mask))
  with_lora = np.asarray(_logits_fn.__wrapped__(config)({"params": variables["params"], "lora": lora}, tokens, mask))
  np.testing.assert_array_equal(with_lora, base)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_merged_equals_unmerged(arch):
  config = CONFIGS[arch]
  params, lora = split_variables(_variables(config))
  lora = _randomize_b(lora)
  tokens, mask = _batch()
  unmerged = _logits(config, combine_variables(params, lora), tokens, mask)
  merged = merge_lora(config, params, lora)
  merged_logits = _logits(merged_config(config), {"params": merged}, tokens, mask)
  base = _logits(merged_config(config), {"params": params}, tokens, mask)
  assert np.abs(unmerged - base).max() > 1e-2  # the adapters really change the outputs
  np.testing.assert_allclose(merged_logits, unmerged, atol=1e-5, rtol=0)
  # Every targeted kernel changed by exactly a @ b * alpha / r (hand einsum per layer), others untouched.
  flat_p = {jax.tree_util.keystr(p): x for p, x in jax.tree.flatten_with_path(params)[0]}
  flat_m = {jax.tree_util.keystr(p): x for p, x in jax.tree.flatten_with_path(merged)[0]}
  assert flat_p.keys() == flat_m.keys()
  adapted = set()
  for path, x in jax.tree.flatten_with_path(lora)[0]:
    key = jax.tree_util.keystr(path)
    if key.endswith("['a']"):
      mod = key[:-len("['a']")]
      a = np.asarray(x, np.float64)
      b = np.asarray(
          functools.reduce(lambda n, k: n[k.key], path[:-1], lora)["b"], np.float64)
      delta = np.einsum("lir,lro->lio", a, b) * config.lora.alpha / config.lora.rank
      np.testing.assert_allclose(np.asarray(flat_m[mod + "['kernel']"]),
                                 np.asarray(flat_p[mod + "['kernel']"]) + delta, atol=1e-6)
      adapted.add(mod + "['kernel']")
  names = {k.split("']['")[-2] for k in adapted}
  assert names == set(config.lora.targets)
  for k in flat_p.keys() - adapted:
    np.testing.assert_array_equal(np.asarray(flat_m[k]), np.asarray(flat_p[k]))


def test_generate_with_lora_equals_merged():
  params, lora = split_variables(_variables(LLAMA))
  lora = _randomize_b(lora)
  tokens, mask = _batch()
  out = generate(Transformer(LLAMA), combine_variables(params, lora), tokens, mask, max_new_tokens=6,
                 greedy=True)
  ref = generate(Transformer(merged_config(LLAMA)), merge_lora(LLAMA, params, lora), tokens, mask,
                 max_new_tokens=6, greedy=True)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(ref.tokens_BxN))
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), np.asarray(ref.logprobs_BxN), atol=1e-5)


def test_dropout_only_when_not_deterministic_with_rng():
  config = LLAMA.replace(lora=LoRAConfig(rank=R, alpha=8.0, dropout=0.5, targets=("q_proj", "v_proj")))
  no_drop = LLAMA.replace(lora=LoRAConfig(rank=R, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj")))
  params, lora = split_variables(_variables(config))
  lora_b = _randomize_b(lora)
  tokens, mask = _batch()

  fns = {d: jax.jit(lambda v, t, m, r, d=d: Transformer(config, deterministic=d).apply(v, t, m, rngs=r).logits)
         for d in (True, False)}

  def run(cfg, lora, deterministic, rngs):
    assert cfg is config
    return np.asarray(fns[deterministic](combine_variables(params, lora), tokens, mask, rngs))

  reference = _logits(no_drop, combine_variables(params, lora_b), tokens, mask)
  # deterministic=True: no dropout, even with a dropout rng.
  np.testing.assert_array_equal(run(config, lora_b, True, {"dropout": jax.random.key(0)}), reference)
  # deterministic=False: dropout is applied (differs, depends on the key, reproducible per key).
  d0 = run(config, lora_b, False, {"dropout": jax.random.key(0)})
  d1 = run(config, lora_b, False, {"dropout": jax.random.key(1)})
  assert np.abs(d0 - reference).max() > 1e-3 and np.abs(d0 - d1).max() > 1e-3
  np.testing.assert_array_equal(run(config, lora_b, False, {"dropout": jax.random.key(0)}), d0)
  # Dropout acts on the LoRA branch only: with B = 0 the output is the base model's exactly.
  np.testing.assert_array_equal(run(config, lora, False, {"dropout": jax.random.key(0)}),
                                _logits(merged_config(config), {"params": params}, tokens, mask))
  # Without a 'dropout' rng, deterministic=False is an error (not a silent no-op).
  with pytest.raises(flax.errors.InvalidRngError):
    Transformer(config, deterministic=False).apply(combine_variables(params, lora_b), tokens, mask)


def test_lora_only_optimizer_changes_only_lora():
  variables = _variables(LLAMA)
  variables = {"params": variables["params"], "lora": _randomize_b(variables["lora"])}
  tokens, mask = _batch()

  def loss(v):
    logits = Transformer(LLAMA).apply(v, tokens, mask).logits
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.jit(jax.grad(loss))(variables)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))  # all leaves get gradients

  mask_tree = lora_trainable_mask(variables)
  assert all(jax.tree.leaves(mask_tree["lora"])) and not any(jax.tree.leaves(mask_tree["params"]))
  inverted = jax.tree.map(lambda b: not b, mask_tree)
  by_mask = optax.chain(optax.masked(optax.adam(1e-2), mask_tree), optax.masked(optax.set_to_zero(), inverted))
  for tx in (lora_only(optax.adam(1e-2)), by_mask):
    step = jax.jit(lambda g, v, tx=tx: optax.apply_updates(v, tx.update(g, tx.init(v), v)[0]))
    new = step(grads, variables)
    for old_leaf, new_leaf in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(new["params"])):
      np.testing.assert_array_equal(np.asarray(new_leaf), np.asarray(old_leaf))
    for old_leaf, new_leaf in zip(jax.tree.leaves(variables["lora"]), jax.tree.leaves(new["lora"])):
      assert np.abs(np.asarray(new_leaf) - np.asarray(old_leaf)).min() > 0
  # lora_only keeps Adam moments only for the adapters.
  state_size = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lora_only(optax.adam(1e-2)).init, variables)))
  assert state_size == 2 * lora_param_count(LLAMA) + 1  # mu + nu + step count
  # The trap lora_only avoids: optax.masked alone passes raw gradients to the masked-out leaves.
  tx = optax.masked(optax.sgd(1e-2), mask_tree)
  updates, _ = tx.update(grads, tx.init(variables), variables)
  assert np.abs(np.asarray(jax.tree.leaves(updates["params"])[0])).max() > 0


def test_param_count_by_hand():
  d, hq, hkv, m, r = D, H * HD, KV * HD, M, R
  per_layer_llama = (r * (d + hq) + 2 * r * (d + hkv) + r * (hq + d)  # q, k, v, o
                     + 2 * r * (d + m) + r * (m + d))  # gate, up, down
  assert lora_param_count(LLAMA) == LAYERS * per_layer_llama == sum(
      x.size for x in jax.tree.leaves(_variables(LLAMA)["lora"]))
  per_layer_gpt2 = r * (d + 3 * d) + r * (d + d) + r * (d + m) + r * (m + d)  # c_attn, attn c_proj, c_fc, mlp c_proj
  assert lora_param_count(GPT2) == LAYERS * per_layer_gpt2
  only_qv = LLAMA.replace(lora=LoRAConfig(rank=16, targets=("q_proj", "v_proj")))
  assert lora_param_count(only_qv) == LAYERS * 16 * ((d + hq) + (d + hkv))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora_param_count(merged_config(LLAMA))
