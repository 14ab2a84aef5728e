"""Evaluation metrics (numpy, host-side) for PRO reports.

Utility, Pareto front, hypervolume, win rate, Spearman / top-1 agreement between weight vectors,
KL to the reference from per-token log-probs, and the prompt-aware gap of the paper's theorem.
All functions maximize (higher reward / utility is better).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def utility(weights_NxK, normalized_rewards_NxK) -> np.ndarray:
  """Per-prompt utility U = sum_k w*_k(x) r~_k(x, y) -> [N]."""
  w = np.asarray(weights_NxK, np.float64)
  r = np.asarray(normalized_rewards_NxK, np.float64)
  if w.shape != r.shape:
    raise ValueError(f"utility: weights shape {w.shape} != rewards shape {r.shape}")
  return np.sum(w * r, axis=-1)


def objective_means(rewards_NxK, objectives: Sequence[str], mask_NxK=None) -> dict[str, float]:
  """Per-objective mean {name: mean} over the rows where mask == 1 (all rows by default)."""
  r = np.asarray(rewards_NxK, np.float64)
  m = np.ones_like(r) if mask_NxK is None else (np.asarray(mask_NxK) != 0).astype(np.float64)
  out = {}
  for k, name in enumerate(objectives):
    n = m[:, k].sum()
    out[name] = float(np.sum(np.where(m[:, k] > 0, r[:, k], 0.0)) / n) if n else float("nan")
  return out


def pareto_mask(points_NxK, chunk: int = 1024) -> np.ndarray:
  """Boolean [N]: True for non-dominated points (maximize every coordinate).

  p is dominated when some q has q >= p everywhere and q > p somewhere; exact duplicates do not
  dominate each other (both stay). Exact O(N^2 K), chunked to bound memory.
  """
  p = np.asarray(points_NxK, np.float64)
  if p.ndim != 2:
    raise ValueError(f"pareto_mask: points must be [N, K], got shape {p.shape}")
  if np.isnan(p).any():
    raise ValueError("pareto_mask: NaN in points")
  keep = np.ones(p.shape[0], bool)
  for start in range(0, p.shape[0], chunk):
    block = p[start:start + chunk]                         # [C, K] candidates
    ge = np.all(p[None, :, :] >= block[:, None, :], axis=-1)   # [C, N]: q >= p
    gt = np.any(p[None, :, :] > block[:, None, :], axis=-1)
    keep[start:start + chunk] = ~np.any(ge & gt, axis=1)
  return keep


def pareto_front(points_NxK) -> np.ndarray:
  """The non-dominated points (rows of `points_NxK`, in their original order)."""
  p = np.asarray(points_NxK, np.float64)
  return p[pareto_mask(p)]


def _hv2d(points_Nx2: np.ndarray, ref_2: np.ndarray) -> float:
  """Exact 2-D hypervolume by a sweep over x (descending): sum of new area strips."""
  p = points_Nx2[np.all(points_Nx2 > ref_2, axis=1)]
  if p.shape[0] == 0:
    return 0.0
  order = np.lexsort((-p[:, 1], -p[:, 0]))                # x desc, then y desc
  p = p[order]
  volume, best_y = 0.0, ref_2[1]
  for i in range(p.shape[0]):
    x, y = p[i]
    next_x = p[i + 1, 0] if i + 1 < p.shape[0] else ref_2[0]
    best_y = max(best_y, y)
    volume += (x - next_x) * (best_y - ref_2[1])
  return float(volume)


def _hv_exact(points: np.ndarray, ref: np.ndarray) -> float:
  """Exact hypervolume by slicing the last coordinate, recursing down to the 2-D sweep."""
  k = points.shape[1]
  p = points[np.all(points > ref, axis=1)]
  if p.shape[0] == 0:
    return 0.0
  if k == 1:
    return float(p[:, 0].max() - ref[0])
  if k == 2:
    return _hv2d(p, ref)
  levels = np.unique(p[:, -1])[::-1]                      # distinct last coords, descending
  volume = 0.0
  for i, z in enumerate(levels):
    next_z = levels[i + 1] if i + 1 < levels.size else ref[-1]
    slab = p[p[:, -1] >= z, :-1]
    volume += _hv_exact(slab, ref[:-1]) * (z - next_z)
  return float(volume)


def hypervolume(points_NxK, reference_K, method: str = "auto", num_samples: int = 200_000,
                seed: int = 0) -> float:
  """Volume of the region dominated by the points and dominating `reference_K` (maximize).

  Only points strictly better than the reference in every coordinate contribute.
  method: `exact` (slicing the last coordinate down to a 2-D sweep; exact for any K, cost grows
  like N^(K-1) log N), `mc` (Monte Carlo: `num_samples` uniform points in the box [ref,
  max(points)], seeded; standard error about V * sqrt(p(1-p)/num_samples)), or `auto`
  (exact for K <= 3, Monte Carlo above).
  """
  p = np.asarray(points_NxK, np.float64)
  ref = np.asarray(reference_K, np.float64)
  if p.ndim != 2 or ref.shape != (p.shape[1],):
    raise ValueError(f"hypervolume: points [N, K] and reference [K] expected, got {p.shape}, {ref.shape}")
  if np.isnan(p).any() or np.isnan(ref).any():
    raise ValueError("hypervolume: NaN in points or reference")
  if method == "auto":
    method = "exact" if p.shape[1] <= 3 else "mc"
  p = p[np.all(p > ref, axis=1)]
  if p.shape[0] == 0:
    return 0.0
  if method == "exact":
    return _hv_exact(pareto_front(p), ref)
  if method != "mc":
    raise ValueError(f"hypervolume method must be auto, exact or mc, got {method!r}")
  rng = np.random.default_rng(seed)
  upper = p.max(axis=0)
  box = float(np.prod(upper - ref))
  front = pareto_front(p)
  hits = 0
  for start in range(0, num_samples, 8192):
    n = min(8192, num_samples - start)
    u = ref + rng.random((n, p.shape[1])) * (upper - ref)
    hits += int(np.sum(np.any(np.all(front[None, :, :] >= u[:, None, :], axis=-1), axis=1)))
  return box * hits / num_samples


def win_rate(scores_a_N, scores_b_N) -> float:
  """Share of prompts where A beats B (ties count half): mean(1[a > b] + 0.5 * 1[a == b])."""
  a = np.asarray(scores_a_N, np.float64)
  b = np.asarray(scores_b_N, np.float64)
  if a.shape != b.shape or a.size == 0:
    raise ValueError(f"win_rate: need equal non-empty shapes, got {a.shape} and {b.shape}")
  return float(np.mean((a > b) + 0.5 * (a == b)))


def rankdata(x) -> np.ndarray:
  """Ranks 1..N along the last axis, ties get their average rank."""
  x = np.asarray(x, np.float64)
  return np.apply_along_axis(_rank_1d, -1, x) if x.ndim > 1 else _rank_1d(x)


def _rank_1d(x: np.ndarray) -> np.ndarray:
  """Average ranks by sorting, O(N log N): each tie run gets the mean of its positions + 1."""
  order = np.argsort(x, kind="stable")
  xs = x[order]
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])       # first index of each tie run
  ends = np.r_[starts[1:], xs.size]                               # one past its last index
  run_rank = (starts + ends - 1) / 2.0 + 1.0
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def spearman(x_N, y_N) -> float:
  """Spearman rank correlation of two vectors (average ranks for ties); NaN if either is constant."""
  rx, ry = rankdata(x_N), rankdata(y_N)
  if rx.shape != ry.shape or rx.ndim != 1:
    raise ValueError(f"spearman: need two vectors of equal length, got {rx.shape} and {ry.shape}")
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denom = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def mean_row_spearman(x_NxK, y_NxK) -> tuple[float, int]:
  """Mean over rows of the per-row Spearman correlation, skipping rows where it is undefined
  (a constant row) -> (mean, number of rows used); NaN if no row is defined."""
  x = np.asarray(x_NxK, np.float64)
  y = np.asarray(y_NxK, np.float64)
  rhos = [spearman(a, b) for a, b in zip(x, y)]
  rhos = [r for r in rhos if not np.isnan(r)]
  return (float(np.mean(rhos)) if rhos else float("nan")), len(rhos)


def top1_agreement(a_NxK, b_NxK) -> float:
  """Share of rows whose argmax agrees (ties resolved to the first index, as np.argmax)."""
  a = np.asarray(a_NxK)
  b = np.asarray(b_NxK)
  if a.shape != b.shape:
    raise ValueError(f"top1_agreement: shapes {a.shape} and {b.shape} differ")
  return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def kl_from_logprobs(logp_NxT, ref_logp_NxT, mask_NxT) -> float:
  """Mean over responses of sum_t mask * (logp - ref_logp). An estimate of KL(pi || pi_ref) only
  when the responses are samples of pi at temperature 1 (see `kl_estimate`)."""
  logp = np.asarray(logp_NxT, np.float64)
  ref = np.asarray(ref_logp_NxT, np.float64)
  m = np.asarray(mask_NxT) != 0
  return float(np.mean(np.sum(np.where(m, logp - ref, 0.0), axis=-1)))


def kl_estimate(logp_N, ref_logp_N) -> dict[str, float]:
  """Monte Carlo estimate of KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from
  sequence log-probs [N] of responses SAMPLED from pi at temperature 1 without top-k / top-p (other
  responses, e.g. greedy decodes, give a log-ratio that is not this expectation).

  Returns {"kl": mean, "sem": its standard error (std / sqrt(N), ddof 1; 0 for N = 1)}. Single
  draws can be negative; the mean converges to the (non-negative) KL.
  """
  d = np.asarray(logp_N, np.float64) - np.asarray(ref_logp_N, np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f"kl_estimate: need two equal non-empty vectors [N], got shape {d.shape}")
  sem = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
  return {"kl": float(d.mean()), "sem": sem}


def best_candidate_utility(weights_NxK, candidate_rewards: Sequence) -> float:
  """The ceiling over a candidate set: E_x max_y U(x, y) = mean_x max_j w*(x) . r~(x, y_j), with
  `candidate_rewards[i]` the [C_i, K] normalized rewards of prompt i's candidates (C_i >= 1)."""
  w = np.asarray(weights_NxK, np.float64)
  if len(candidate_rewards) != w.shape[0]:
    raise ValueError(f"best_candidate_utility: {w.shape[0]} weight rows, {len(candidate_rewards)} candidate sets")
  best = []
  for i, r in enumerate(candidate_rewards):
    r = np.asarray(r, np.float64).reshape(-1, w.shape[1])
    if r.shape[0] == 0:
      raise ValueError(f"best_candidate_utility: prompt {i} has no candidate")
    best.append(float(np.max(r @ w[i])))
  return float(np.mean(best))


def pick_best(utilities: dict[str, float], names: Sequence[str]) -> str:
  """The name in `names` with the highest utility (first on ties); e.g. the best fixed vector
  picked on a validation split, whose evaluation-set utility is then reported."""
  if not names:
    raise ValueError("pick_best: no names")
  return max(names, key=lambda n: utilities[n])


def prompt_aware_gap(utility_NxW) -> tuple[float, float]:
  """The theorem's two sides for utilities U[x, w] of W candidate weight vectors on N prompts:
  (E_x max_w U(x, w), max_w E_x U(x, w)); the first is always >= the second."""
  u = np.asarray(utility_NxW, np.float64)
  if u.ndim != 2:
    raise ValueError(f"prompt_aware_gap: utilities must be [N, W], got {u.shape}")
  return float(u.max(axis=1).mean()), float(u.mean(axis=0).max())
