"""PPO pieces for MORLHF (+ PRO): KL-penalized rewards, GAE, whitening, clipped losses, KL control.

The formulas follow TRL's (legacy, v0.4-v0.11) `PPOTrainer` (`compute_rewards`,
`compute_advantages`, `loss`) and `core.masked_whiten`, which implement Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences") and Schulman et al. 2017 (PPO) /
2015 (GAE). All functions are pure, jittable and shape-static.

Layout: every per-token array is [B, T] with `mask[b, t] = 1` on the response tokens (the
actions). `logp[b, t]` is the log-prob of token t (logits at t - 1, see `ops.token_logprobs`)
and `values[b, t]` the value estimate of the state before token t is generated (value head read
at t - 1) -- the caller aligns them; here they are just aligned arrays.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pro_jax.pro import ops

Array = jax.Array
Metrics = dict[str, Array]


def kl_penalized_rewards(score_B: Array, logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array,
                         kl_coef: Array | float) -> Array:
  """Per-token rewards [B, T] (TRL `PPOTrainer.compute_rewards`, KL penalty "kl"):

    r_t = -kl_coef * (logp_t - ref_logp_t) on response tokens, plus score_b at the last
    response token; 0 outside the mask. `kl_coef` may be a traced scalar (adaptive controller).
  """
  mask = mask_BxT.astype(jnp.float32)
  kl_BxT = logp_BxT.astype(jnp.float32) - ref_logp_BxT.astype(jnp.float32)
  rewards_BxT = jnp.where(mask != 0, -kl_coef * kl_BxT, 0.0)
  last_B = ops.last_index(mask_BxT)
  has_B = jnp.any(mask != 0, axis=-1)
  at_last_BxT = jax.nn.one_hot(last_B, mask.shape[-1], dtype=jnp.float32)
  return rewards_BxT + at_last_BxT * jnp.where(has_B, score_B.astype(jnp.float32), 0.0)[:, None]


def sequence_kl(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array) -> Array:
  """Sampled KL estimate per response [B]: sum_t mask * (logp - ref_logp)."""
  return ops.masked_sum(logp_BxT - ref_logp_BxT, mask_BxT, axis=-1)


def gae(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
  """Generalized advantage estimation by a reverse `lax.scan` -> (advantages, returns), [B, T].

    delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
    A_t     = m_t * (delta_t + gamma * lam * m_{t+1} A_{t+1}),   returns = m * (A + V)

  The trajectory is the masked span: the last response token is terminal (no bootstrap), and
  masked positions carry nothing. For a contiguous mask this equals TRL's
  `compute_advantages` (which zeroes masked values and rewards first). Advantages are NOT
  whitened here (TRL whitens after computing returns: call `whiten`).
  """
  m = mask_BxT.astype(jnp.float32)
  r = rewards_BxT.astype(jnp.float32) * m
  v = values_BxT.astype(jnp.float32) * m

  def step(carry, xs):
    next_adv_B, next_value_B, next_mask_B = carry
    r_B, v_B, m_B = xs
    delta_B = r_B + gamma * next_mask_B * next_value_B - v_B
    adv_B = m_B * (delta_B + gamma * lam * next_mask_B * next_adv_B)
    return (adv_B, v_B, m_B), adv_B

  zeros_B = jnp.zeros(m.shape[:1], jnp.float32)
  _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B, zeros_B), (r.T, v.T, m.T), reverse=True)
  advantages_BxT = adv_TxB.T
  return advantages_BxT, (advantages_BxT + v) * m


def whiten(x_BxT: Array, mask_BxT: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """TRL `masked_whiten`: (x - mean) / sqrt(var + eps) over masked entries, unbiased variance
  (Bessel n / (n - 1)); `shift_mean=False` adds the mean back. Masked-out entries are set to 0.
  """
  m = mask_BxT.astype(jnp.float32)
  x = x_BxT.astype(jnp.float32)
  mean = ops.masked_mean(x, m)
  var = ops.masked_mean((x - mean) ** 2, m)
  n = jnp.sum(m)
  var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), 1.0)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(m != 0, out, 0.0)


def ppo_policy_loss(logp_BxT: Array, old_logp_BxT: Array, advantages_BxT: Array, mask_BxT: Array,
                    clip_eps: float) -> tuple[Array, Metrics]:
  """Clipped surrogate (TRL `PPOTrainer.loss`):

    ratio = exp(logp - old_logp)
    loss  = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

  `old_logp` and the advantages are constants (stop-gradient). Metrics: `loss`, `clipfrac`
  (share of tokens where the clipped term is the larger), `approx_kl` (0.5 * mean (logp -
  old_logp)^2, TRL), `policy_kl` (mean old_logp - logp), `ratio` (mean).
  """
  m = mask_BxT.astype(jnp.float32)
  old = jax.lax.stop_gradient(old_logp_BxT.astype(jnp.float32))
  adv = jax.lax.stop_gradient(advantages_BxT.astype(jnp.float32))
  log_ratio = logp_BxT.astype(jnp.float32) - old
  # masked positions may hold arbitrary log-probs: keep exp() finite there
  ratio = jnp.exp(jnp.where(m != 0, log_ratio, 0.0))
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = ops.masked_mean(jnp.maximum(pg1, pg2), m)
  lr = jax.lax.stop_gradient(log_ratio)
  metrics: Metrics = {
      "loss": loss,
      "clipfrac": ops.masked_mean((pg2 > pg1).astype(jnp.float32), m),
      "approx_kl": 0.5 * ops.masked_mean(lr ** 2, m),
      "policy_kl": ops.masked_mean(-lr, m),
      "ratio": ops.masked_mean(jax.lax.stop_gradient(ratio), m),
  }
  return loss, metrics


def ppo_value_loss(values_BxT: Array, old_values_BxT: Array, returns_BxT: Array, mask_BxT: Array,
                   clip_value: float) -> tuple[Array, Metrics]:
  """Clipped value loss (TRL `PPOTrainer.loss`):

    v_clipped = clip(v, old_v - c, old_v + c)
    loss = 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2))

  `old_values` and the returns are constants. Metrics: `loss`, `clipfrac` (share of tokens
  where the clipped error is the larger), `error` (mean (v - R)^2), `mean` (mean v).
  """
  m = mask_BxT.astype(jnp.float32)
  v = values_BxT.astype(jnp.float32)
  old = jax.lax.stop_gradient(old_values_BxT.astype(jnp.float32))
  ret = jax.lax.stop_gradient(returns_BxT.astype(jnp.float32))
  v_clipped = jnp.clip(v, old - clip_value, old + clip_value)
  l1 = (v - ret) ** 2
  l2 = (v_clipped - ret) ** 2
  loss = 0.5 * ops.masked_mean(jnp.maximum(l1, l2), m)
  metrics: Metrics = {
      "loss": loss,
      "clipfrac": ops.masked_mean((l2 > l1).astype(jnp.float32), m),
      "error": ops.masked_mean(jax.lax.stop_gradient(l1), m),
      "mean": ops.masked_mean(jax.lax.stop_gradient(v), m),
  }
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# KL controllers: functional state (a pytree) + static configuration (hashable)
# ----------------------------------------------------------------------------------------------

class KLState(NamedTuple):
  """The KL coefficient as a float32 scalar array (lives in the train state)."""
  kl_coef: Array


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
  """Ziegler et al. 2019 / TRL `AdaptiveKLController`, as a pure state update:

    e = clip(kl / target - 1, -0.2, 0.2);   kl_coef <- kl_coef * (1 + e * n_steps / horizon)

  `kl` is the current mean per-response KL (sum over tokens, `sequence_kl` averaged); TRL passes
  `n_steps` = the rollout batch size. `update` is jittable (kl / n_steps may be traced).
  """
  init_kl_coef: float = 0.2
  target: float = 6.0
  horizon: float = 10000.0

  def __post_init__(self):
    if not (self.init_kl_coef >= 0 and self.target > 0 and self.horizon > 0):
      raise ValueError(f"AdaptiveKLController needs init_kl_coef >= 0, target > 0, horizon > 0; got "
                       f"{self.init_kl_coef}, {self.target}, {self.horizon}")

  def init(self) -> KLState:
    return KLState(jnp.asarray(self.init_kl_coef, jnp.float32))

  def update(self, state: KLState, current_kl: Array | float, n_steps: Array | int) -> KLState:
    err = jnp.clip(jnp.asarray(current_kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
    mult = 1.0 + err * jnp.asarray(n_steps, jnp.float32) / self.horizon
    return KLState(state.kl_coef * mult)


@dataclasses.dataclass(frozen=True)
class FixedKLController:
  """Constant KL coefficient (same interface as `AdaptiveKLController`)."""
  kl_coef: float = 0.2

  def init(self) -> KLState:
    return KLState(jnp.asarray(self.kl_coef, jnp.float32))

  def update(self, state: KLState, current_kl: Array | float, n_steps: Array | int) -> KLState:
    del current_kl, n_steps
    return state
