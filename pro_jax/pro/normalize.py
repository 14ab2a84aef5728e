"""Per-objective reward normalization (PRO stage 2): statistics fitted on training responses.

`fit_norm_stats` computes the statistics (numpy, float64, host-side, once); `NormStats.apply`
maps raw rewards [N, K] to normalized ones with numpy or, given a jax array (also a tracer inside
jit), with jax.numpy. The statistics are JSON-able (`to_dict` / `from_dict`, `save` / `load`) to
be saved next to a checkpoint and reused at deployment.

Methods:
- `zscore` (default): r~ = (r - mean) / (std + eps), population std (ddof = 0).
- `minmax`: r~ = (r - min) / (max - min + eps), in [0, 1] on the training data (may leave it).
- `quantile`: r~ = empirical CDF in [0, 1] from Q stored quantile knots (levels 0, 1/(Q-1), ..., 1;
  numpy's linear quantiles), linearly interpolated between knots, clamped outside them. Values
  equal to several knots (a tie plateau, e.g. discrete scores) get the middle of the plateau's
  levels (average-rank convention).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("zscore", "minmax", "quantile")


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
  """Fitted per-objective statistics.

  method: one of METHODS. objectives: K names. loc / scale: [K] (zscore: mean / std; minmax:
  min / max - min; quantile: median / IQR, informational). knots: [Q, K] quantile knots (quantile
  method only, else None). count: [K] number of responses each objective was fitted on.
  """
  method: str
  objectives: tuple[str, ...]
  loc: np.ndarray
  scale: np.ndarray
  count: np.ndarray
  knots: np.ndarray | None = None
  eps: float = 1e-8

  @property
  def num_objectives(self) -> int:
    return len(self.objectives)

  def apply(self, rewards_NxK):
    """Normalize rewards [..., K] (numpy in -> numpy out, jax in -> jax out; jittable)."""
    is_jax = isinstance(rewards_NxK, jax.Array)
    xp = jnp if is_jax else np
    r = rewards_NxK.astype(xp.float32) if is_jax else np.asarray(rewards_NxK, np.float64)
    if r.shape[-1] != self.num_objectives:
      raise ValueError(f"NormStats for {list(self.objectives)} got rewards with last dim "
                       f"{r.shape[-1]} (expected {self.num_objectives})")
    dtype = r.dtype
    if self.method == "zscore":
      return (r - self.loc.astype(dtype)) / (self.scale.astype(dtype) + self.eps)
    if self.method == "minmax":
      return (r - self.loc.astype(dtype)) / (self.scale.astype(dtype) + self.eps)
    return _quantile_cdf(r, self.knots.astype(dtype), xp)

  def to_dict(self) -> dict[str, Any]:
    d = {
        "method": self.method,
        "objectives": list(self.objectives),
        "loc": self.loc.tolist(),
        "scale": self.scale.tolist(),
        "count": self.count.tolist(),
        "eps": self.eps,
    }
    if self.knots is not None:
      d["knots"] = self.knots.tolist()
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "NormStats dict") -> "NormStats":
    """Inverse of `to_dict`, with validation (errors name `source` and the field)."""
    for field in ("method", "objectives", "loc", "scale", "count"):
      if field not in d:
        raise ValueError(f"{source}: missing field {field!r}")
    method = d["method"]
    if method not in METHODS:
      raise ValueError(f"{source}: field 'method' must be one of {METHODS}, got {method!r}")
    objectives = tuple(str(o) for o in d["objectives"])
    k = len(objectives)
    arrays = {}
    for field in ("loc", "scale", "count"):
      a = np.asarray(d[field], np.float64)
      if a.shape != (k,):
        raise ValueError(f"{source}: field {field!r} has shape {a.shape}, expected ({k},)")
      arrays[field] = a
    knots = None
    if method == "quantile":
      if "knots" not in d:
        raise ValueError(f"{source}: field 'knots' is required for method 'quantile'")
      knots = np.asarray(d["knots"], np.float64)
      if knots.ndim != 2 or knots.shape[1] != k or knots.shape[0] < 2:
        raise ValueError(f"{source}: field 'knots' has shape {knots.shape}, expected (Q>=2, {k})")
      if np.any(np.diff(knots, axis=0) < 0):
        raise ValueError(f"{source}: field 'knots' must be non-decreasing along Q")
    return cls(method=method, objectives=objectives, knots=knots,
               eps=float(d.get("eps", 1e-8)), **arrays)

  def save(self, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file + rename): an existing file is replaced only on success."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(self.to_dict(), f, indent=1)
      os.replace(tmp, path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike) -> "NormStats":
    with open(path) as f:
      return cls.from_dict(json.load(f), source=str(path))


def fit_norm_stats(rewards_NxK, objectives: Sequence[str], method: str = "zscore",
                   score_mask_NxK=None, num_quantiles: int = 1001, eps: float = 1e-8) -> NormStats:
  """Fit per-objective statistics on training responses' rewards [N, K].

  `score_mask_NxK` (1 = scored) restricts each objective's statistics to its scored responses;
  unscored entries may hold anything (NaN included). Errors (ValueError naming the objective):
  NaN / inf among the scored rewards, an objective with no scored response, and a constant
  objective (max == min: its scale would be 0).
  """
  if method not in METHODS:
    raise ValueError(f"normalization method must be one of {METHODS}, got {method!r}")
  r = np.asarray(rewards_NxK, np.float64)
  objectives = tuple(objectives)
  if r.ndim != 2 or r.shape[1] != len(objectives):
    raise ValueError(f"rewards must be [N, K={len(objectives)}] for objectives {list(objectives)}, "
                     f"got shape {r.shape}")
  if score_mask_NxK is None:
    mask = np.ones(r.shape, bool)
  else:
    mask = np.asarray(score_mask_NxK) != 0
    if mask.shape != r.shape:
      raise ValueError(f"score_mask shape {mask.shape} != rewards shape {r.shape}")
  if method == "quantile" and num_quantiles < 2:
    raise ValueError(f"num_quantiles must be >= 2, got {num_quantiles}")
  k_count = len(objectives)
  loc, scale, count = np.zeros(k_count), np.zeros(k_count), np.zeros(k_count)
  knots = np.zeros((num_quantiles, k_count)) if method == "quantile" else None
  levels = np.linspace(0.0, 1.0, num_quantiles) if method == "quantile" else None
  for k, name in enumerate(objectives):
    col = r[mask[:, k], k]
    bad = ~np.isfinite(col)
    if bad.any():
      row = int(np.flatnonzero(mask[:, k])[np.argmax(bad)])
      raise ValueError(f"objective {name!r}: non-finite reward {col[np.argmax(bad)]} at row {row}")
    if col.size == 0:
      raise ValueError(f"objective {name!r}: no scored responses to fit normalization on")
    if col.max() == col.min():
      raise ValueError(f"objective {name!r}: constant reward {col[0]} over {col.size} responses "
                       f"(std 0), cannot normalize")
    count[k] = col.size
    if method == "zscore":
      loc[k], scale[k] = col.mean(), col.std()
    elif method == "minmax":
      loc[k], scale[k] = col.min(), col.max() - col.min()
    else:
      knots[:, k] = np.quantile(col, levels)
      q25, q50, q75 = np.quantile(col, [0.25, 0.5, 0.75])
      loc[k], scale[k] = q50, q75 - q25
  return NormStats(method=method, objectives=objectives, loc=loc, scale=scale, count=count,
                   knots=knots, eps=eps)


def _interp_right(x_N, xp_Q, fp_Q, xp):
  """Piecewise-linear interpolation; at a run of equal knots, takes the run's LAST level.
  Clamped to fp[0] / fp[-1] outside the knots. Same arithmetic for numpy and jax.numpy."""
  q = xp_Q.shape[0]
  i = xp.clip(xp.searchsorted(xp_Q, x_N, side="right"), 1, q - 1)
  x0, x1 = xp_Q[i - 1], xp_Q[i]
  f0, f1 = fp_Q[i - 1], fp_Q[i]
  dx = x1 - x0
  # a zero-width interval (equal knots): the later level at or above it, the earlier below it
  t = xp.where(dx > 0, (x_N - x0) / xp.where(dx > 0, dx, 1.0), xp.where(x_N >= x1, 1.0, 0.0))
  t = xp.clip(t, 0.0, 1.0)
  return f0 + t * (f1 - f0)


def _cdf_column(x_N, knots_Q, xp):
  levels_Q = xp.linspace(0.0, 1.0, knots_Q.shape[0]).astype(knots_Q.dtype)
  right = _interp_right(x_N, knots_Q, levels_Q, xp)
  left = _interp_right(-x_N, -knots_Q[::-1], levels_Q[::-1], xp)   # first level of a tie run
  return 0.5 * (left + right)


def _quantile_cdf(r_NxK, knots_QxK, xp):
  shape = r_NxK.shape
  flat = r_NxK.reshape(-1, shape[-1])
  if xp is jnp:
    out = jax.vmap(lambda x, kn: _cdf_column(x, kn, jnp), in_axes=(1, 1), out_axes=1)(flat, knots_QxK)
  else:
    out = np.stack([_cdf_column(flat[:, k], knots_QxK[:, k], np) for k in range(shape[-1])], axis=1)
  return out.reshape(shape)
