"""Array primitives shared by the PRO losses: token log-probs, masked reductions, pooling.

All functions are pure `jax.numpy`, jittable, shape-static and free of host syncs. Token
convention (docs/ARCHITECTURE.md): the log-prob of token `t` comes from the logits at `t - 1`;
`loss_mask[b, t] = 1` marks a response token `t` to predict, so position 0 never carries a loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _shift_left(x_BxL: Array) -> Array:
  """x[:, t + 1] at position t, 0 at the last position (same shape, no slicing of big arrays)."""
  return jnp.concatenate([x_BxL[:, 1:], jnp.zeros_like(x_BxL[:, :1])], axis=1)


def _shift_right(x_BxL: Array) -> Array:
  """x[:, t - 1] at position t, 0 at position 0."""
  return jnp.concatenate([jnp.zeros_like(x_BxL[:, :1]), x_BxL[:, :-1]], axis=1)


def _pick(logits_BxLxV: Array, index_BxL: Array) -> Array:
  """logits[b, l, index[b, l]] as float32.

  Written as a compare-select-reduce over the vocabulary instead of a gather: XLA fuses it into
  one pass over the logits (no [B, L, V] temporary) and it partitions cleanly when the vocabulary
  axis is sharded (a gather on a sharded axis would all-gather the logits).
  """
  vocab = logits_BxLxV.shape[-1]
  iota_V = jax.lax.broadcasted_iota(jnp.int32, (1, 1, vocab), 2)
  hit_BxLxV = iota_V == index_BxL[..., None].astype(jnp.int32)
  return jnp.sum(jnp.where(hit_BxLxV, logits_BxLxV.astype(jnp.float32), 0.0), axis=-1)


def token_logprobs(logits_BxLxV: Array, tokens_BxL: Array) -> Array:
  """Per-token log-probs [B, L] float32: out[b, t] = log p(tokens[b, t] | tokens[b, :t]).

  Uses the logits at position t - 1; out[:, 0] = 0. Computed as `logit[target] - logsumexp(logits)`
  in float32 (never materializes a full log_softmax). Positions outside the loss mask hold finite
  but meaningless values: multiply by the mask.
  """
  targets_BxL = _shift_left(tokens_BxL)               # token t + 1 predicted at position t
  lse_BxL = jax.nn.logsumexp(logits_BxLxV.astype(jnp.float32), axis=-1)
  logp_next_BxL = _pick(logits_BxLxV, targets_BxL) - lse_BxL
  return _shift_right(logp_next_BxL)


def response_window(tokens_BxL: Array, loss_mask_BxL: Array, window: int) -> tuple[Array, Array, Array]:
  """The `window` token slots of each row starting at its first loss-mask position.

  Returns (logit_positions_BxR, targets_BxR, mask_BxR), R = min(window, L - 1): the logits that
  predict those tokens sit one position earlier; slots past the row's end are masked out. The
  loss mask must lie inside the window (a response of at most `window` tokens); use
  `window_sequence_logprob`, which turns a row whose loss mask does not fit into NaN.
  """
  B, L = tokens_BxL.shape
  R = min(int(window), L - 1)
  first_B = jnp.argmax(loss_mask_BxL > 0, axis=1).astype(jnp.int32)
  first_B = jnp.maximum(first_B, 1)  # position 0 has no logit predicting it
  token_pos_BxR = first_B[:, None] + jnp.arange(R, dtype=jnp.int32)[None]
  inside_BxR = token_pos_BxR < L
  token_pos_BxR = jnp.minimum(token_pos_BxR, L - 1)
  targets_BxR = jnp.take_along_axis(tokens_BxL, token_pos_BxR, axis=1)
  mask_BxR = jnp.take_along_axis(loss_mask_BxL, token_pos_BxR, axis=1).astype(jnp.float32) * inside_BxR
  return token_pos_BxR - 1, targets_BxR, mask_BxR


def window_sequence_logprob(logits_BxRxV: Array, targets_BxR: Array, mask_BxR: Array,
                            loss_mask_BxL: Array, average: bool = False) -> Array:
  """`sequence_logprob` from windowed logits (`response_window`): sum (mean when `average`) of the
  targets' log-probs. NaN for a row whose loss mask has tokens outside the window (never silently
  dropped)."""
  logits = logits_BxRxV.astype(jnp.float32)
  logp_BxR = _pick(logits, targets_BxR) - jax.nn.logsumexp(logits, axis=-1)
  total_B = (masked_mean if average else masked_sum)(logp_BxR, mask_BxR, axis=-1)
  covered_B = jnp.sum(mask_BxR, axis=-1) == jnp.sum(loss_mask_BxL.astype(jnp.float32), axis=-1)
  return jnp.where(covered_B, total_B, jnp.nan)


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
  """sum(x * mask) over `axis`; entries where mask == 0 are ignored even if x is inf / nan there."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask != 0, x.astype(jnp.float32) * mask, 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """sum(x * mask) / sum(mask) over `axis`; 0 where the mask sums to 0 (no nan, gradient 0)."""
  total = masked_sum(x, mask, axis=axis)
  count = jnp.sum(mask.astype(jnp.float32), axis=axis)
  return total / jnp.where(count != 0, count, 1.0)


def sequence_logprob(logits_BxLxV: Array, tokens_BxL: Array, loss_mask_BxL: Array,
                     average: bool = False) -> Array:
  """log pi(response | prompt) [B]: sum of response-token log-probs (mean when `average`).

  `average=True` is the length-normalized variant (TRL uses it for the IPO loss).
  """
  logp_BxL = token_logprobs(logits_BxLxV, tokens_BxL)
  if average:
    return masked_mean(logp_BxL, loss_mask_BxL, axis=-1)
  return masked_sum(logp_BxL, loss_mask_BxL, axis=-1)


def entropy_from_logits(logits_BxLxV: Array) -> Array:
  """Entropy [B, L] of softmax(logits) at every position: logsumexp(z) - sum_v p_v z_v (float32)."""
  logits = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits, axis=-1)
  p_BxLxV = jnp.exp(logits - lse_BxL[..., None])
  return lse_BxL - jnp.sum(p_BxLxV * logits, axis=-1)


def mean_pool(hidden_BxLxD: Array, mask_BxL: Array) -> Array:
  """Mean of hidden states over positions where mask == 1 -> [B, D] float32 (0 for empty rows)."""
  mask_BxL = mask_BxL.astype(jnp.float32)
  total_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD.astype(jnp.float32), mask_BxL)
  count_Bx1 = jnp.sum(mask_BxL, axis=-1, keepdims=True)
  return total_BxD / jnp.maximum(count_Bx1, 1.0)


def last_index(mask_BxL: Array) -> Array:
  """Index [B] of the last position where mask != 0 (0 for an all-zero row)."""
  length = mask_BxL.shape[-1]
  rev_first = jnp.argmax(mask_BxL[:, ::-1] != 0, axis=-1)
  return jnp.where(jnp.any(mask_BxL != 0, axis=-1), length - 1 - rev_first, 0).astype(jnp.int32)
