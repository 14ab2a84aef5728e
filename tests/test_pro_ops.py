"""pro_jax.pro.ops against hand-computed values and a plain numpy re-implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.pro import ops


def _np_token_logprobs(logits, tokens):
  """Plain loops: out[b, t] = log softmax(logits[b, t - 1])[tokens[b, t]], out[:, 0] = 0."""
  b_n, l_n, _ = logits.shape
  out = np.zeros((b_n, l_n))
  for b in range(b_n):
    for t in range(1, l_n):
      z = logits[b, t - 1].astype(np.float64)
      out[b, t] = z[tokens[b, t]] - (z.max() + math.log(np.exp(z - z.max()).sum()))
  return out


def test_token_logprobs_hand_values():
  # position 0 predicts token 1 with logits [0, ln 2, ln 5] -> p = 2 / 8
  logits = np.zeros((1, 3, 3), np.float32)
  logits[0, 0] = [0.0, math.log(2), math.log(5)]
  logits[0, 1] = [0.0, 0.0, 0.0]                       # uniform: p = 1/3
  tokens = np.array([[2, 1, 0]])
  out = np.asarray(ops.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  np.testing.assert_allclose(out, [[0.0, math.log(2 / 8), math.log(1 / 3)]], rtol=1e-6, atol=1e-7)


def test_token_logprobs_random_vs_numpy_and_jit():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  tokens = rng.integers(0, 7, size=(2, 5))
  got = jax.jit(ops.token_logprobs)(jnp.asarray(logits), jnp.asarray(tokens))
  assert got.dtype == jnp.float32 and got.shape == (2, 5)
  np.testing.assert_allclose(np.asarray(got), _np_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)


def test_token_logprobs_stable_and_bf16():
  logits = np.array([[[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]]], np.float32)
  tokens = np.array([[0, 0]])
  out = np.asarray(ops.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  np.testing.assert_allclose(out, [[0.0, 0.0]], atol=1e-6)    # p(token 0 | logits 1e4, ...) = 1
  out16 = ops.token_logprobs(jnp.asarray(logits[:, ::-1]).astype(jnp.bfloat16), jnp.asarray(tokens))
  assert out16.dtype == jnp.float32
  assert np.isfinite(np.asarray(out16)).all()


def test_sequence_logprob_sum_and_average():
  logits = np.zeros((1, 4, 4), np.float32)                  # uniform: every token log(1/4)
  tokens = np.array([[1, 2, 3, 0]])
  loss_mask = np.array([[0, 0, 1, 1]])
  s = ops.sequence_logprob(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))
  np.testing.assert_allclose(np.asarray(s), [2 * math.log(0.25)], rtol=1e-6)
  a = ops.sequence_logprob(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask), average=True)
  np.testing.assert_allclose(np.asarray(a), [math.log(0.25)], rtol=1e-6)


def test_window_sequence_logprob_average_matches_full_average():
  """IPO feeds length-averaged log-probs (TRL): the windowed path gives them too."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, 5)).astype(np.float32))
  tokens = jnp.asarray(np.array([[1, 2, 3, 4, 0, 0], [1, 2, 4, 3, 2, 1]]))
  loss_mask = jnp.asarray(np.array([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]))
  positions, targets, wmask = ops.response_window(tokens, loss_mask, 4)
  win_logits = jnp.take_along_axis(logits, positions[:, :, None], axis=1)
  for average in (False, True):
    full = ops.sequence_logprob(logits, tokens, loss_mask, average=average)
    win = ops.window_sequence_logprob(win_logits, targets, wmask, loss_mask, average=average)
    np.testing.assert_allclose(np.asarray(win), np.asarray(full), rtol=1e-5)
  avg = np.asarray(ops.window_sequence_logprob(win_logits, targets, wmask, loss_mask, average=True))
  tot = np.asarray(ops.window_sequence_logprob(win_logits, targets, wmask, loss_mask))
  np.testing.assert_allclose(avg, tot / np.array([2, 4]), rtol=1e-5)


def test_masked_mean_sum_empty_nan_and_grad():
  x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, 5.0, 6.0]])
  m = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(ops.masked_sum(x, m)), 3.0)
  np.testing.assert_allclose(np.asarray(ops.masked_mean(x, m)), 1.5)
  np.testing.assert_allclose(np.asarray(ops.masked_mean(x, m, axis=-1)), [1.5, 0.0])
  g = jax.grad(lambda v: ops.masked_mean(v, m))(x)
  np.testing.assert_allclose(np.asarray(g), [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])


def test_entropy_from_logits():
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -jnp.inf, -jnp.inf]]])
  ent = np.asarray(ops.entropy_from_logits(jnp.nan_to_num(logits, neginf=-1e9)))
  # uniform over 4: log 4; p = (3/4, 1/4): -(3/4 log 3/4 + 1/4 log 1/4)
  np.testing.assert_allclose(ent, [[math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]],
                             rtol=1e-5)


def test_mean_pool_and_last_index():
  h = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  m = jnp.array([[0, 1, 1], [0, 0, 0]])
  pooled = np.asarray(ops.mean_pool(h, m))
  # row 0: mean of [2, 3] and [4, 5] -> [3, 4]; empty row -> 0
  np.testing.assert_allclose(pooled, [[3.0, 4.0], [0.0, 0.0]])
  idx = np.asarray(ops.last_index(jnp.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])))
  np.testing.assert_array_equal(idx, [1, 3, 0])
