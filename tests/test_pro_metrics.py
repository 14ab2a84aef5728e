"""Evaluation metrics against hand-computed values."""

import math

import numpy as np
import pytest

from pro_jax.pro import metrics


def test_utility_and_objective_means():
  np.testing.assert_allclose(metrics.utility([[0.5, 0.5], [1.0, 0.0]], [[2.0, -1.0], [3.0, 9.0]]), [0.5, 3.0])
  means = metrics.objective_means([[1.0, 5.0], [3.0, 7.0]], ["a", "b"], mask_NxK=[[1, 0], [1, 1]])
  assert means == {"a": 2.0, "b": 7.0}


def test_pareto_front_filter():
  pts = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0], [0.5, 0.2], [0.2, 1.0]])
  # (0.4,0.4) < (0.5,0.5); (0.5,0.2) < (0.5,0.5); (0,1) < (0.2,1); duplicate (1,0) both kept
  np.testing.assert_array_equal(metrics.pareto_mask(pts), [True, False, True, False, True, False, True])
  np.testing.assert_array_equal(metrics.pareto_front(pts), pts[[0, 2, 4, 6]])
  np.testing.assert_array_equal(metrics.pareto_mask(pts, chunk=2), metrics.pareto_mask(pts))


def test_hypervolume_2d_hand():
  pts = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [1.5, 1.5]]     # last one dominated
  assert metrics.hypervolume(pts, [0.0, 0.0]) == pytest.approx(6.0)  # strips 3*1 + 2*1 + 1*1
  assert metrics.hypervolume(pts, [1.0, 1.0]) == pytest.approx(1.0)  # only (2,2) is above (1,1)
  assert metrics.hypervolume([[0.5, 9.0]], [1.0, 0.0]) == 0.0         # not better than ref everywhere


def test_hypervolume_3d_hand():
  assert metrics.hypervolume([[1.0, 1.0, 1.0]], [0, 0, 0]) == pytest.approx(1.0)
  # inclusion-exclusion: 2 + 2 + 2 - 3 * 1 + 1 = 4
  assert metrics.hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(4.0)
  assert metrics.hypervolume([[2, 2, 1], [1, 1, 3]], [0, 0, 0]) == pytest.approx(4 + 3 - 1)
  assert metrics.hypervolume([[2, 2, 1], [1, 1, 3]], [0.5, 0.5, 0.5]) == pytest.approx(
      1.5 * 1.5 * 0.5 + 0.5 * 0.5 * 2.5 - 0.5 * 0.5 * 0.5)


def test_hypervolume_4d_exact_and_monte_carlo():
  pts = [[2, 1, 1, 1], [1, 2, 1, 1], [1, 1, 1, 3]]
  # 2 + 2 + 3 - 1 - 1 - 1 + 1 = 5
  assert metrics.hypervolume(pts, [0, 0, 0, 0], method="exact") == pytest.approx(5.0)
  mc = metrics.hypervolume(pts, [0, 0, 0, 0], num_samples=100_000, seed=1)
  assert abs(mc - 5.0) < 0.1                                  # box 12, ~5 sigma = 0.08
  assert metrics.hypervolume(pts, [0, 0, 0, 0], seed=1, num_samples=100_000) == mc   # seeded


def test_win_rate_ties_half():
  assert metrics.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_spearman_with_ties_and_rows():
  assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  # ranks (2.5, 2.5, 1) vs (3, 2, 1): 1.5 / sqrt(1.5 * 2)
  assert metrics.spearman([0.4, 0.4, 0.2], [0.5, 0.3, 0.2]) == pytest.approx(1.5 / math.sqrt(3.0))
  assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))
  np.testing.assert_array_equal(metrics.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
  np.testing.assert_array_equal(metrics.rankdata([[2.0, 2.0, 2.0], [0.0, 5.0, 0.0]]), [[2, 2, 2], [1.5, 3, 1.5]])
  mean, n = metrics.mean_row_spearman([[1, 2, 3], [1, 1, 1], [3, 2, 1]], [[1, 2, 3], [1, 2, 3], [1, 2, 3]])
  assert (mean, n) == (pytest.approx(0.0), 2)


def test_top1_kl_and_prompt_aware_gap():
  assert metrics.top1_agreement([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], [[0.9, 0.1], [0.7, 0.3], [0.9, 0.1]]) == \
      pytest.approx(2 / 3)
  logp = [[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]]
  ref = [[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]]
  mask = [[1, 1, 0], [1, 1, 1]]
  assert metrics.kl_from_logprobs(logp, ref, mask) == pytest.approx((-0.5 + 1.5) / 2)
  # U[x, w]: prompt 0 prefers w0, prompt 1 prefers w1
  e_max, max_e = metrics.prompt_aware_gap([[1.0, 0.0], [0.0, 1.0]])
  assert (e_max, max_e) == (1.0, 0.5)


def test_kl_estimate_from_temperature_one_samples_matches_exact_kl():
  """Sequences of 3 tokens from per-position categoricals p (policy) and q (reference): the mean
  log-ratio of samples of p estimates sum_t KL(p_t || q_t); the greedy sequence's log-ratio is a
  different number (what the old report called KL)."""
  rng = np.random.default_rng(0)
  p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]])
  q = np.array([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.25, 0.5, 0.25]])
  exact = float(np.sum(p * np.log(p / q)))
  y = np.stack([rng.choice(3, size=20000, p=p[t]) for t in range(3)], axis=1)   # [N, T]
  logp = np.log(p[np.arange(3), y]).sum(1)
  logq = np.log(q[np.arange(3), y]).sum(1)
  est = metrics.kl_estimate(logp, logq)
  assert abs(est["kl"] - exact) < 3 * est["sem"] + 1e-3 and est["sem"] < 0.01
  greedy = p.argmax(1)
  greedy_ratio = float(np.log(p[np.arange(3), greedy] / q[np.arange(3), greedy]).sum())
  assert abs(greedy_ratio - exact) > 0.3
  with pytest.raises(ValueError):
    metrics.kl_estimate([], [])


def test_best_candidate_utility_and_pick_best():
  w = [[1.0, 0.0], [0.5, 0.5]]
  cands = [[[0.2, 9.0], [0.7, -1.0]], [[1.0, 1.0], [3.0, -2.0], [-1.0, 2.5]]]
  # prompt 0: max(0.2, 0.7) = 0.7; prompt 1: max(1.0, 0.5, 0.75) = 1.0
  assert metrics.best_candidate_utility(w, cands) == pytest.approx(0.85)
  with pytest.raises(ValueError, match="no candidate"):
    metrics.best_candidate_utility(w, [[[1.0, 0.0]], []])
  u = {"a": 0.1, "b": 0.4, "c": 0.4, "d": 9.0}
  assert metrics.pick_best(u, ["a", "b", "c"]) == "b"
