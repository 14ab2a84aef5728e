"""Objective weights: targets, weights_source parsing / resolution, simplex grid, weight text."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.pro import weights


def test_target_weights_hand_values():
  r = jnp.array([[0.0, math.log(2.0)], [1.0, 1.0]])
  np.testing.assert_allclose(np.asarray(jax.jit(weights.target_weights)(r, 1.0)),
                             [[1 / 3, 2 / 3], [0.5, 0.5]], rtol=1e-6)
  # tau 0.5 doubles the logits: (1, 4) / 5
  np.testing.assert_allclose(np.asarray(weights.target_weights(r, 0.5))[0], [0.2, 0.8], rtol=1e-6)
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="tau"):
      weights.target_weights(r, bad)


def test_target_weights_score_mask():
  r = jnp.array([[0.0, math.log(3.0), 50.0], [1.0, 2.0, 3.0]])
  m = jnp.array([[1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(np.asarray(weights.target_weights(r, 1.0, m)),
                             [[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)


def test_parse_weights_source():
  assert weights.parse_weights_source("target", 3) == weights.WeightsSource("target", 3)
  assert weights.parse_weights_source(" adapter ", 3).kind == "adapter"
  assert weights.parse_weights_source("uniform", 2).kind == "uniform"
  a = weights.parse_weights_source("fixed:[0.2,0.3,0.5]", 3)
  b = weights.parse_weights_source("fixed:0.2, 0.3, 0.5", 3)
  assert a == b and a.values == pytest.approx((0.2, 0.3, 0.5))
  c = weights.parse_weights_source("fixed:0.3333,0.3333,0.3334", 3)     # within 1e-3 -> renormalized
  assert math.fsum(c.values) == pytest.approx(1.0, abs=1e-15)
  d = weights.parse_weights_source("fixed:0.333,0.333,0.333", 3)        # sum .999: accepted, rescaled
  assert d.values == pytest.approx((1 / 3,) * 3, abs=1e-12)
  assert str(weights.parse_weights_source(str(a), 3)) == str(a)
  for spec, msg in [("fixed:0.2,0.3,0.6", "sum to"), ("fixed:0.5,0.5", "2 weights for K=3"),
                    ("fixed:-0.5,1.0,0.5", "non-negative"), ("fixed:a,b,c", "numbers"),
                    ("fixed:nan,0.5,0.5", "finite"), ("best", "one of")]:
    with pytest.raises(ValueError, match=msg):
      weights.parse_weights_source(spec, 3)


def test_resolve_weights_all_sources_under_jit():
  tw = jnp.array([[0.1, 0.9], [0.6, 0.4], [0.5, 0.5]])
  batch = {"prompt_tokens": jnp.zeros((3, 4), jnp.int32), "target_weights": tw}
  adapter_fn = lambda b: jax.nn.softmax(jnp.zeros((b["prompt_tokens"].shape[0], 2)) + jnp.array([0.0, math.log(3)]))
  for spec, want in [("target", np.asarray(tw)), ("uniform", np.full((3, 2), 0.5)),
                     ("fixed:[0.25,0.75]", np.tile([0.25, 0.75], (3, 1))),
                     ("adapter", np.tile([0.25, 0.75], (3, 1)))]:
    src = weights.parse_weights_source(spec, 2)
    got = jax.jit(lambda b: weights.resolve_weights(src, b, adapter_fn))(batch)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # constants: no gradient flows into the target weights
  source = weights.WeightsSource("target", 2)
  g = jax.grad(lambda t: jnp.sum(weights.resolve_weights(source, {"target_weights": t}) ** 2))(tw)
  assert np.all(np.asarray(g) == 0)
  with pytest.raises(ValueError, match="target_weights"):
    weights.resolve_weights(weights.WeightsSource("target", 2), {"prompt_tokens": jnp.zeros((3, 4))})
  with pytest.raises(ValueError, match="adapter_fn"):
    weights.resolve_weights(weights.WeightsSource("adapter", 2), batch)


def test_simplex_grid_counts_and_exact_values():
  g3 = weights.simplex_grid(3, 0.25)
  assert g3.shape == (15, 3)
  assert len({tuple(r) for r in g3}) == 15
  np.testing.assert_array_equal(g3[0], [1.0, 0.0, 0.0])
  assert set(np.unique(g3)) == {0.0, 0.25, 0.5, 0.75, 1.0}
  np.testing.assert_array_equal(g3.sum(1), np.ones(15))
  g2 = weights.simplex_grid(2, 0.1)
  assert g2.shape == (11, 2)
  np.testing.assert_array_equal(g2[:, 0], [10 / 10, 9 / 10, 8 / 10, 7 / 10, 6 / 10, 5 / 10, 4 / 10,
                                            3 / 10, 2 / 10, 1 / 10, 0.0])
  assert weights.simplex_grid(4, 0.5).shape == (10, 4)             # C(2 + 3, 3)
  with pytest.raises(ValueError, match="1/n"):
    weights.simplex_grid(3, 0.3)


def test_weights_text_format_and_parse():
  names = ["helpful", "harmless", "humor"]
  s = weights.format_weights_text([0.5, 0.3, 0.2], names)
  assert s == "<w> helpful 0.5 harmless 0.3 humor 0.2 </w>"
  assert weights.format_weights_text([1 / 3] * 3, names) == "<w> helpful 0.4 harmless 0.3 humor 0.3 </w>"
  assert weights.format_weights_text([0.123, 0.456, 0.421], names, decimals=2) == \
      "<w> helpful 0.12 harmless 0.46 humor 0.42 </w>"
  got = weights.parse_weights_text("User: hi " + s + " Assistant:", names)
  np.testing.assert_allclose(got, [0.5, 0.3, 0.2])
  np.testing.assert_allclose(weights.parse_weights_text("<w> humor 1 helpful 1 harmless 2 </w>", names),
                             [0.25, 0.5, 0.25])
  for text, msg in [("no block", "no <w>"), ("<w> helpful 0.5 harmless 0.5 </w>", "missing"),
                    ("<w> helpful 0.5 helpful 0.5 humor 0 harmless 0 </w>", "twice"),
                    ("<w> fun 1 helpful 0 harmless 0 humor 0 </w>", "unknown"),
                    ("<w> helpful x harmless 0.5 humor 0.5 </w>", "not a number")]:
    with pytest.raises(ValueError, match=msg):
      weights.parse_weights_text(text, names)
  with pytest.raises(ValueError, match="whitespace"):
    weights.format_weights_text([0.5, 0.5], ["very helpful", "x"])


def test_rewards_text_and_ric_preference_to_reward_map():
  """RiC conditions on target rewards: "<r> name value ... </r>" and RiC's map from a preference
  to target rewards (l2 / linear / linf), checked by hand."""
  assert weights.format_rewards_text([0.5, -1.23, -0.04], ["a", "b", "c"]) == "<r> a 0.5 b -1.2 c 0.0 </r>"
  with pytest.raises(ValueError):
    weights.format_rewards_text([0.5, float("nan")], ["a", "b"])
  lo, hi = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
  # l2: w / |w| = (0.6, 0.8) for w = (0.3, 0.4)/0.7 -> (-2 + 0.6 * 4, 0.8) = (0.4, 0.8)
  np.testing.assert_allclose(weights.rewards_from_preference([3 / 7, 4 / 7], lo, hi), [0.4, 0.8])
  np.testing.assert_allclose(weights.rewards_from_preference([[0.25, 0.75]], lo, hi, "linear"), [[-1.0, 0.8]])
  # linf: the top objective gets high, the other min(K w, 1) of the span: 2 * 0.25 = 0.5 -> 0.0
  np.testing.assert_allclose(weights.rewards_from_preference([0.25, 0.75], lo, hi, "linf"), [0.0, 1.0])
  with pytest.raises(ValueError, match="method"):
    weights.rewards_from_preference([0.5, 0.5], lo, hi, "l1")
