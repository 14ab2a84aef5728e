"""Reward normalization: hand-computed statistics, round trips, masks, errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.pro.normalize import NormStats, fit_norm_stats

REWARDS = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 60.0]])


def test_zscore_hand_values_numpy_and_jax():
  st = fit_norm_stats(REWARDS, ["a", "b"])
  np.testing.assert_allclose(st.loc, [2.5, 30.0])
  np.testing.assert_allclose(st.scale, [math.sqrt(1.25), math.sqrt(350.0)])   # population std
  want = np.array([[-1.5 / math.sqrt(1.25), -20 / math.sqrt(350.0)]])
  np.testing.assert_allclose(st.apply(np.array([[1.0, 10.0]])), want, rtol=1e-7)
  got = jax.jit(st.apply)(jnp.array([[1.0, 10.0]]))
  assert isinstance(got, jax.Array) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_minmax_hand_values():
  st = fit_norm_stats(REWARDS, ["a", "b"], method="minmax")
  np.testing.assert_allclose(st.apply(np.array([[2.5, 35.0], [5.0, 0.0]])),
                             [[0.5, 0.5], [4 / 3, -0.2]], rtol=1e-6)


def test_quantile_cdf_interpolation_and_ties():
  col_a = np.array([4.0, 0.0, 2.0, 1.0, 3.0])             # knots at levels 0, .25, ..., 1 = 0..4
  col_b = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
  st = fit_norm_stats(np.stack([col_a, col_b], 1), ["a", "b"], method="quantile", num_quantiles=5)
  np.testing.assert_allclose(st.knots[:, 0], [0, 1, 2, 3, 4])
  # np.quantile of [0,0,0,1,1] at 0,.25,.5,.75,1 -> positions 0,1,2,3,4 -> 0,0,0,1,1
  np.testing.assert_allclose(st.knots[:, 1], [0, 0, 0, 1, 1])
  x = np.array([[2.0, 0.0], [2.5, 1.0], [-7.0, 0.5], [9.0, 3.0], [1.0, -1.0]])
  # a: 2 -> .5, 2.5 -> .625, below -> 0, above -> 1
  # b: 0 is the plateau of levels 0, .25, .5 -> .25; 1 -> (.75 + 1) / 2; 0.5 -> halfway .5 -> .75
  # outside the knots: clamped to 0 / 1 even where the end knots form a plateau
  want = np.array([[0.5, 0.25], [0.625, 0.875], [0.0, 0.625], [1.0, 1.0], [0.25, 0.0]])
  np.testing.assert_allclose(st.apply(x), want, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(jax.jit(st.apply)(jnp.asarray(x))), want, rtol=1e-6)


def test_masked_statistics_ignore_unscored_entries():
  r = np.array([[1.0, np.nan], [3.0, 5.0], [1e9, 7.0]])
  m = np.array([[1, 0], [1, 1], [0, 1]])
  st = fit_norm_stats(r, ["a", "b"], score_mask_NxK=m)
  np.testing.assert_allclose(st.loc, [2.0, 6.0])
  np.testing.assert_allclose(st.scale, [1.0, 1.0])
  np.testing.assert_allclose(st.count, [2, 2])


def test_errors_name_the_objective():
  with pytest.raises(ValueError, match="'b'.*constant"):
    fit_norm_stats(np.array([[1.0, 2.0], [3.0, 2.0]]), ["a", "b"])
  with pytest.raises(ValueError, match="'a'.*non-finite.*row 1"):
    fit_norm_stats(np.array([[1.0, 2.0], [np.nan, 3.0]]), ["a", "b"])
  with pytest.raises(ValueError, match="'b'.*no scored"):
    fit_norm_stats(np.array([[1.0, 2.0], [2.0, 3.0]]), ["a", "b"], score_mask_NxK=[[1, 0], [1, 0]])
  with pytest.raises(ValueError, match="method"):
    fit_norm_stats(REWARDS, ["a", "b"], method="rank")
  with pytest.raises(ValueError, match="last dim"):
    fit_norm_stats(REWARDS, ["a", "b"]).apply(np.zeros((2, 3)))


@pytest.mark.parametrize("method", ["zscore", "minmax", "quantile"])
def test_dict_json_and_file_round_trip(method, tmp_path):
  st = fit_norm_stats(REWARDS, ["help", "harm"], method=method, num_quantiles=11)
  back = NormStats.from_dict(json.loads(json.dumps(st.to_dict())))
  x = np.array([[0.3, 17.0], [3.3, 55.0]])
  np.testing.assert_array_equal(back.apply(x), st.apply(x))
  assert back.objectives == ("help", "harm") and back.method == method
  path = tmp_path / "norm.json"
  st.save(path)
  np.testing.assert_array_equal(NormStats.load(path).apply(x), st.apply(x))


def test_from_dict_validation_names_source_and_field():
  d = fit_norm_stats(REWARDS, ["a", "b"]).to_dict()
  d["scale"] = [1.0]
  with pytest.raises(ValueError, match="ckpt/norm.json.*'scale'"):
    NormStats.from_dict(d, source="ckpt/norm.json")
  with pytest.raises(ValueError, match="'knots'"):
    NormStats.from_dict({**fit_norm_stats(REWARDS, ["a", "b"]).to_dict(), "method": "quantile"})
