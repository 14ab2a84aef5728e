"""PPO pieces against hand-unrolled loops and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.pro import ppo


def _gae_by_hand(rewards, values, mask, gamma, lam):
  """Textbook GAE run separately on each row's response tokens (plain python)."""
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
    last = 0.0
    for j in reversed(range(len(idx))):
      t = idx[j]
      next_v = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0   # terminal after last token
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


def test_gae_matches_hand_loop_with_masks():
  rewards = np.array([[0.1, -0.2, 1.0, 9.0], [7.0, 0.3, 0.0, 2.0]])
  values = np.array([[0.5, 0.4, 0.3, 9.0], [7.0, 0.2, -0.1, 0.6]])
  mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float64)     # right padding / prompt first
  adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(
      jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
      jnp.asarray(mask, jnp.float32), 0.9, 0.8)
  want_adv, want_ret = _gae_by_hand(rewards, values, mask, 0.9, 0.8)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-6)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
  rewards = jnp.array([[1.0, 2.0, 3.0]])
  values = jnp.array([[0.5, 0.5, 0.5]])
  adv, ret = ppo.gae(rewards, values, jnp.ones((1, 3)), 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv), [[5.5, 4.5, 2.5]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), [[6.0, 5.0, 3.0]], rtol=1e-6)


def test_kl_penalized_rewards_and_sequence_kl():
  logp = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
  ref = jnp.array([[-1.5, -1.0, -0.5, 0.0], [-1.0, -2.0, -1.0, -1.0]])
  mask = jnp.array([[0, 1, 1, 0], [0, 0, 0, 0]])
  r = ppo.kl_penalized_rewards(jnp.array([2.0, 5.0]), logp, ref, mask, 0.1)
  # row 0: kl = [-, -1, 0, -]; score 2 at t = 2; row 1 has no response tokens: all 0
  np.testing.assert_allclose(np.asarray(r), [[0.0, 0.1, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]], atol=1e-7)
  np.testing.assert_allclose(np.asarray(ppo.sequence_kl(logp, ref, mask)), [-1.0, 0.0])


def test_whiten_matches_unbiased_formula():
  x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0]])
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float64)
  vals = np.array([1.0, 2.0, 3.0, 4.0])                    # mean 2.5, unbiased var 5/3
  want = (x - 2.5) / math.sqrt(5 / 3 + 1e-8) * mask
  got = ppo.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert vals.mean() == 2.5
  kept = ppo.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.float32), shift_mean=False)
  np.testing.assert_allclose(np.asarray(kept), (want + 2.5) * mask, rtol=1e-5, atol=1e-6)


def test_ppo_policy_loss_clipping_cases():
  eps = 0.2
  # token 0: ratio e^0.5 > 1.2 with A = +1 -> clipped: loss -1.2, no gradient
  # token 1: ratio e^0.5 with A = -1 -> unclipped max: +e^0.5, gradient
  # token 2: ratio 1 (A = 2) -> -2; token 3 masked
  logp = jnp.array([[0.5, 0.5, 0.0, 7.0]])
  old = jnp.zeros((1, 4))
  adv = jnp.array([[1.0, -1.0, 2.0, 100.0]])
  mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  loss, met = jax.jit(ppo.ppo_policy_loss, static_argnums=4)(logp, old, adv, mask, eps)
  np.testing.assert_allclose(float(loss), (-1.2 + math.exp(0.5) - 2.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(met["clipfrac"]), 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(met["approx_kl"]), 0.5 * (0.25 + 0.25) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(met["policy_kl"]), -1 / 3, rtol=1e-6)
  g = np.asarray(jax.grad(lambda lp: ppo.ppo_policy_loss(lp, old, adv, mask, eps)[0])(logp))
  np.testing.assert_allclose(g, [[0.0, math.exp(0.5) / 3, -2.0 / 3, 0.0]], rtol=1e-6)


def test_ppo_value_loss_clipping_cases():
  c = 0.2
  values = jnp.array([[1.0, 1.0, 0.5]])
  old = jnp.array([[0.5, 0.5, 0.5]])
  returns = jnp.array([[2.0, 0.0, 0.4]])
  # token 0: clipped 0.7 -> (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> 1.69 (clipped wins)
  # token 1: (1-0)^2 = 1 vs (0.7-0)^2 = 0.49 -> 1; token 2: 0.01 both
  loss, met = ppo.ppo_value_loss(values, old, returns, jnp.ones((1, 3)), c)
  np.testing.assert_allclose(float(loss), 0.5 * (1.69 + 1.0 + 0.01) / 3, rtol=1e-5)
  np.testing.assert_allclose(float(met["clipfrac"]), 1 / 3, rtol=1e-6)
  g = np.asarray(jax.grad(lambda v: ppo.ppo_value_loss(v, old, returns, jnp.ones((1, 3)), c)[0])(values))
  # token 0 clipped: no gradient; token 1: 0.5 * 2 * (1 - 0) / 3; token 2: 0.5 * 2 * 0.1 / 3
  np.testing.assert_allclose(g, [[0.0, 1 / 3, 0.1 / 3]], rtol=1e-5, atol=1e-7)


def test_adaptive_kl_controller_steps_under_jit():
  ctl = ppo.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000.0)
  update = jax.jit(ctl.update)
  s = ctl.init()
  s_hi = update(s, 12.0, 256)            # error clipped to +0.2
  np.testing.assert_allclose(float(s_hi.kl_coef), 0.2 * (1 + 0.2 * 256 / 10000), rtol=1e-6)
  s_lo = update(s, 3.0, 256)             # -0.5 clipped to -0.2
  np.testing.assert_allclose(float(s_lo.kl_coef), 0.2 * (1 - 0.2 * 256 / 10000), rtol=1e-6)
  s_mid = update(s_hi, 6.6, 64)          # error 0.1
  np.testing.assert_allclose(float(s_mid.kl_coef), 0.2 * 1.00512 * (1 + 0.1 * 64 / 10000), rtol=1e-6)
  fixed = ppo.FixedKLController(0.05)
  assert float(fixed.update(fixed.init(), 100.0, 10).kl_coef) == pytest.approx(0.05)
  with pytest.raises(ValueError):
    ppo.AdaptiveKLController(0.2, target=0.0)
