"""Objective weights: adapter targets, the `weights_source` option, simplex grids, weight text.

- `target_weights`: w*(x) = softmax(r~(x, y_w) / tau) (PRO_METHOD.md stage 3).
- `parse_weights_source` / `resolve_weights`: the policy losses' `weights_source` option
  (`target`, `adapter`, `uniform`, `fixed:[...]`) turned into a [B, K] constant inside the step.
- `simplex_grid`: every weight vector with coordinates in {0, step, 2 step, ..., 1} summing to 1
  (the fixed-weight baselines / Pareto sweeps).
- `format_weights_text` / `parse_weights_text`: RiC-style weight-conditioned prompts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SOURCE_KINDS = ("target", "adapter", "uniform", "fixed")
SUM_TOLERANCE = 1e-3


def target_weights(normalized_rewards_BxK: Array, tau: float | Array = 1.0,
                   score_mask_BxK: Array | None = None) -> Array:
  """w* = softmax(r~ / tau) over objectives, [B, K] float32 (jittable).

  `tau` must be > 0 (checked when it is a Python number). With `score_mask_BxK`, unscored
  objectives get weight 0 and the softmax runs over the scored ones; a row with no scored
  objective gets uniform weights.
  """
  if isinstance(tau, (int, float)) and not tau > 0:
    raise ValueError(f"target_weights: tau must be > 0, got {tau}")
  z_BxK = jnp.asarray(normalized_rewards_BxK, jnp.float32) / tau
  if score_mask_BxK is None:
    return jax.nn.softmax(z_BxK, axis=-1)
  m_BxK = jnp.asarray(score_mask_BxK) != 0
  any_Bx1 = jnp.any(m_BxK, axis=-1, keepdims=True)
  z_BxK = jnp.where(m_BxK, z_BxK, -jnp.inf)
  z_BxK = jnp.where(any_Bx1, z_BxK, 0.0)               # nothing scored: uniform
  return jax.nn.softmax(z_BxK, axis=-1)


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  """Where the policy loss takes its per-prompt weights from (hashable: usable as a static arg).

  kind: `target` (batch["target_weights"], w* from the preferred response), `adapter`
  (adapter_fn(batch) = f_psi(x)), `uniform` (1/K) or `fixed` (`values`, summing to exactly 1).
  """
  kind: str
  num_objectives: int
  values: tuple[float, ...] | None = None

  def __str__(self) -> str:
    if self.kind == "fixed":
      return "fixed:[" + ",".join(repr(v) for v in self.values) + "]"
    return self.kind


def parse_weights_source(spec: str | WeightsSource, num_objectives: int) -> WeightsSource:
  """Parse "target" | "adapter" | "uniform" | "fixed:[0.2,0.3,0.5]" | "fixed:0.2,0.3,0.5".

  Fixed weights must be K finite non-negative numbers whose sum is 1 within 1e-3 (so "0.33,
  0.33,0.34" or rounded values pass, while a typo like "0.2,0.3,0.6" is an error rather than a
  silent rescale); they are then divided by their sum so they sum to 1 (to float precision).
  """
  if isinstance(spec, WeightsSource):
    if spec.num_objectives != num_objectives:
      raise ValueError(f"weights_source {spec} is for K={spec.num_objectives}, expected K={num_objectives}")
    return spec
  if num_objectives < 1:
    raise ValueError(f"weights_source needs K >= 1 objectives, got {num_objectives}")
  text = str(spec).strip()
  if text in ("target", "adapter", "uniform"):
    return WeightsSource(text, num_objectives)
  if not text.startswith("fixed:"):
    raise ValueError(f"weights_source must be one of target, adapter, uniform, fixed:[w1,...,wK]; "
                     f"got {spec!r}")
  body = text[len("fixed:"):].strip()
  if body.startswith("[") and body.endswith("]"):
    body = body[1:-1]
  try:
    values = [float(v) for v in body.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"weights_source {spec!r}: fixed weights must be numbers separated by commas") from None
  if len(values) != num_objectives:
    raise ValueError(f"weights_source {spec!r}: {len(values)} weights for K={num_objectives} objectives")
  if not all(math.isfinite(v) and v >= 0 for v in values):
    raise ValueError(f"weights_source {spec!r}: fixed weights must be finite and non-negative")
  total = math.fsum(values)
  if abs(total - 1.0) > SUM_TOLERANCE:
    raise ValueError(f"weights_source {spec!r}: fixed weights sum to {total}, not 1 (tolerance "
                     f"{SUM_TOLERANCE})")
  return WeightsSource("fixed", num_objectives, tuple(v / total for v in values))


def _batch_size(batch: Mapping[str, Any]) -> int:
  for key in ("target_weights", "prompt_tokens", "tokens", "chosen_tokens"):
    if key in batch:
      return batch[key].shape[0]
  for value in batch.values():
    if hasattr(value, "shape") and len(value.shape) >= 1:
      return value.shape[0]
  raise ValueError("resolve_weights: cannot infer the batch size from a batch with no arrays")


def resolve_weights(source: WeightsSource, batch: Mapping[str, Any],
                    adapter_fn: Callable[[Mapping[str, Any]], Array] | None = None) -> Array:
  """Per-example weights [B, K] float32, as constants (stop-gradient), inside a jitted step.

  target -> batch["target_weights"]; adapter -> adapter_fn(batch) (weights on the simplex, e.g.
  softmax of the adapter's logits); uniform / fixed -> broadcast to the batch size (taken from
  `target_weights`, `prompt_tokens`, `tokens` or `chosen_tokens`, else the first array).
  """
  k = source.num_objectives
  if source.kind == "target":
    if "target_weights" not in batch:
      raise ValueError("weights_source 'target' needs batch['target_weights'] (w* of the preferred response)")
    w_BxK = jnp.asarray(batch["target_weights"], jnp.float32)
  elif source.kind == "adapter":
    if adapter_fn is None:
      raise ValueError("weights_source 'adapter' needs an adapter_fn(batch) -> [B, K]")
    w_BxK = jnp.asarray(adapter_fn(batch), jnp.float32)
  elif source.kind == "uniform":
    w_BxK = jnp.full((_batch_size(batch), k), 1.0 / k, jnp.float32)
  elif source.kind == "fixed":
    w_BxK = jnp.broadcast_to(jnp.asarray(source.values, jnp.float32), (_batch_size(batch), k))
  else:
    raise ValueError(f"unknown weights source kind {source.kind!r}")
  if w_BxK.ndim != 2 or w_BxK.shape[-1] != k:
    raise ValueError(f"weights_source {source}: weights have shape {w_BxK.shape}, expected [B, {k}]")
  return jax.lax.stop_gradient(w_BxK)


def simplex_grid(num_objectives: int, step: float) -> np.ndarray:
  """All weight vectors with coordinates i / n (n = 1 / step, an integer) summing to 1 -> [N, K].

  N = C(n + K - 1, K - 1) (K=3, step 0.25 -> 15; K=2, step 0.1 -> 11). Coordinates are computed as
  i / n from integers (exactly the nearest floats, each row summing to 1 up to rounding), rows in
  lexicographically decreasing order (the first row is (1, 0, ..., 0)).
  """
  if num_objectives < 1:
    raise ValueError(f"simplex_grid needs K >= 1, got {num_objectives}")
  if not step > 0:
    raise ValueError(f"simplex_grid step must be > 0, got {step}")
  n = round(1.0 / step)
  if n < 1 or abs(n * step - 1.0) > 1e-9:
    raise ValueError(f"simplex_grid step must be 1/n for an integer n, got {step}")
  rows = []
  for parts in itertools.product(range(n, -1, -1), repeat=num_objectives - 1):
    if sum(parts) <= n:
      rows.append(list(parts) + [n - sum(parts)])
  return np.asarray(rows, np.int64).reshape(-1, num_objectives) / n


# ----------------------------------------------------------------------------------------------
# RiC-style weight-conditioned prompts
# ----------------------------------------------------------------------------------------------

W_OPEN, W_CLOSE = "<w>", "</w>"
_W_RE = re.compile(re.escape(W_OPEN) + r"(.*?)" + re.escape(W_CLOSE), re.S)


def _round_to_sum(values: np.ndarray, decimals: int) -> np.ndarray:
  """Largest-remainder rounding: multiples of 10^-decimals that sum to exactly 1 (in units)."""
  unit = 10 ** decimals
  scaled = values / values.sum() * unit
  floors = np.floor(scaled).astype(np.int64)
  short = unit - int(floors.sum())
  order = np.argsort(-(scaled - floors), kind="stable")
  floors[order[:short]] += 1
  return floors


def format_weights_text(weights: Sequence[float], objectives: Sequence[str], decimals: int = 1) -> str:
  """"<w> helpful 0.5 harmless 0.3 humor 0.2 </w>" for a weight-conditioned prompt.

  Names and numbers are separated by spaces (short, tokenizer-friendly, one number per name).
  Values are rounded to `decimals` places with the largest-remainder method so the printed
  weights sum to exactly 1 (1/3 each -> 0.4 0.3 0.3). Names must not contain whitespace.
  """
  w = np.asarray(weights, np.float64)
  if w.shape != (len(objectives),):
    raise ValueError(f"format_weights_text: {w.shape[0] if w.ndim else 'scalar'} weights for "
                     f"objectives {list(objectives)}")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"format_weights_text: weights must be non-negative with a positive sum, got {w}")
  for name in objectives:
    if not name or re.search(r"\s", name) or "<" in name or ">" in name:
      raise ValueError(f"format_weights_text: objective name {name!r} must be non-empty, without "
                       "whitespace or angle brackets")
  units = _round_to_sum(w, decimals)
  parts = [f"{name} {u / 10 ** decimals:.{decimals}f}" for name, u in zip(objectives, units)]
  return f"{W_OPEN} {' '.join(parts)} {W_CLOSE}"


def parse_weights_text(text: str, objectives: Sequence[str]) -> np.ndarray:
  """Read the first "<w> name value ... </w>" block of `text` -> weights [K] in `objectives` order,
  divided by their sum. Every objective must appear exactly once, and no other name."""
  match = _W_RE.search(text)
  if match is None:
    raise ValueError(f"parse_weights_text: no {W_OPEN} ... {W_CLOSE} block in {text!r}")
  tokens = match.group(1).split()
  if len(tokens) % 2:
    raise ValueError(f"parse_weights_text: expected 'name value' pairs in {match.group(0)!r}")
  found: dict[str, float] = {}
  for name, value in zip(tokens[::2], tokens[1::2]):
    if name not in objectives:
      raise ValueError(f"parse_weights_text: unknown objective {name!r} (expected {list(objectives)})")
    if name in found:
      raise ValueError(f"parse_weights_text: objective {name!r} appears twice in {match.group(0)!r}")
    try:
      found[name] = float(value)
    except ValueError:
      raise ValueError(f"parse_weights_text: {value!r} for {name!r} is not a number") from None
  missing = [o for o in objectives if o not in found]
  if missing:
    raise ValueError(f"parse_weights_text: objectives {missing} missing from {match.group(0)!r}")
  w = np.asarray([found[o] for o in objectives], np.float64)
  if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"parse_weights_text: weights must be non-negative with a positive sum, got {w}")
  return w / w.sum()


# ---------------------------------------------------------------------------------------------
# RiC proper: conditioning on target reward values [RiC]

R_OPEN, R_CLOSE = "<r>", "</r>"
RIC_REWARD_MAPS = ("l2", "linf", "linear")


def format_rewards_text(rewards: Sequence[float], objectives: Sequence[str], decimals: int = 1) -> str:
  """"<r> helpful 0.5 harmless -1.2 </r>": RiC's conditioning on (normalized) reward values
  (Yang et al. 2024: each training response is conditioned on its own rewards, rounded to one
  decimal; at inference a preference is mapped to target rewards, `rewards_from_preference`)."""
  r = np.asarray(rewards, np.float64)
  if r.shape != (len(objectives),) or not np.all(np.isfinite(r)):
    raise ValueError(f"format_rewards_text: need {len(objectives)} finite rewards for {list(objectives)}, got {r}")
  for name in objectives:
    if not name or re.search(r"\s", name) or "<" in name or ">" in name:
      raise ValueError(f"format_rewards_text: objective name {name!r} must be non-empty, without "
                       "whitespace or angle brackets")
  vals = np.round(r, decimals) + 0.0  # + 0.0: no "-0.0"
  parts = [f"{name} {v:.{decimals}f}" for name, v in zip(objectives, vals)]
  return f"{R_OPEN} {' '.join(parts)} {R_CLOSE}"


def rewards_from_preference(weights_NxK, low_K, high_K, method: str = "l2", decimals: int = 1) -> np.ndarray:
  """RiC's preference-to-reward map (`map_rewards_from_preference` in YangRui2015/RiC ric/utils.py):
  target rewards [N, K] for weights [N, K] (or [K]), with low / high the range of each objective's
  normalized rewards (RiC: the 0 and 1 quantiles of a reference sample), rounded to `decimals`:

    l2:     r_k = w_k / ||w||_2 * (high_k - low_k) + low_k          (RiC's evaluation default)
    linear: r_k = w_k * (high_k - low_k) + low_k
    linf:   r_k = high_k for k = argmax w; else min(K w_k, 1) * (high_k - low_k) + low_k
  """
  if method not in RIC_REWARD_MAPS:
    raise ValueError(f"rewards_from_preference: method must be one of {RIC_REWARD_MAPS}, got {method!r}")
  w = np.asarray(weights_NxK, np.float64)
  single = w.ndim == 1
  w = np.atleast_2d(w)
  lo, hi = np.asarray(low_K, np.float64), np.asarray(high_K, np.float64)
  if lo.shape != (w.shape[1],) or hi.shape != (w.shape[1],) or np.any(hi < lo):
    raise ValueError(f"rewards_from_preference: low / high must be [K={w.shape[1]}] with low <= high, "
                     f"got {lo} / {hi}")
  span = hi - lo
  if method == "l2":
    norm = np.sqrt(np.sum(w * w, axis=1, keepdims=True))
    out = w / np.where(norm > 0, norm, 1.0) * span + lo
  elif method == "linear":
    out = w * span + lo
  else:
    out = np.minimum(w.shape[1] * w, 1.0) * span + lo
    top = np.argmax(w, axis=1)
    out[np.arange(len(w)), top] = hi[top]
  out = np.round(out, decimals) + 0.0
  return out[0] if single else out
