"""The PPO stage's model side (`pro_jax.stages.ppo` runs it): the settings (`PPOConfig`), the value
head's LoRA layout, the forward over rollout rows, the loss plug-in `ppo_loss`, the stage's task
builder `ppo_task` (also used by `pro-jax aot`) and the jitted rollout statistics `rollout_fn`.
Alignment and formulas: docs/ppo.md and the `pro_jax.stages.ppo` docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pro_jax.models import ModelConfig, Transformer, abstract_variables, init_variables, logical_axes
from pro_jax.models.heads import head_to_lora, head_to_params
from pro_jax.pro import ops
from pro_jax.pro import ppo as ppo_math
from pro_jax.stages.stage import Layout, StageInputs, make_task, trained_passes
from pro_jax.train.trainer import Task

Array = jax.Array
VALUE_HEAD = "value_head"


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO settings. Defaults follow the paper's PPO setting where known (PRO_METHOD.md: batch 64, init
  KL 0.2, adaptive target 3, temperature 0.7, max_new_tokens 128) and TRL's PPOTrainer elsewhere
  (ppo_epochs 4, gamma 1, lam 0.95, clip 0.2, vf_coef 0.1, value clip 0.2, horizon 10000).

  iterations: rollout + update rounds. rollout_batch: prompts per rollout (the paper's "batch 64").
  minibatch: rows per optimizer step (the engine's batch_size); ppo_epochs passes over the rollout.
  max_prompt_len: prompts are cut from the left to this many tokens (left-padded to a multiple of 8).
  kl_coef: initial KL coefficient; adaptive_kl: Ziegler's controller (target, horizon) else fixed.
  reward_clip: clip the scalarized reward R to [-reward_clip, reward_clip]; None = off.
  template: prompt template ("auto" / "chat" / "plain"), as in the data pipeline.
  """

  iterations: int = 100
  rollout_batch: int = 64
  minibatch: int = 16
  ppo_epochs: int = 4
  max_prompt_len: int = 64
  max_new_tokens: int = 128
  temperature: float = 0.7
  top_k: int = 0
  top_p: float = 1.0
  kl_coef: float = 0.2
  adaptive_kl: bool = True
  kl_target: float = 3.0
  kl_horizon: float = 10000.0
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  clip_eps: float = 0.2
  vf_coef: float = 0.1
  vf_clip: float = 0.2
  entropy_coef: float = 0.0
  reward_clip: float | None = None
  template: str = "auto"

  def check(self) -> None:
    """Raise ValueError listing every inconsistent field."""
    errors = []
    for f in ("iterations", "rollout_batch", "minibatch", "ppo_epochs", "max_prompt_len", "max_new_tokens"):
      if int(getattr(self, f)) != getattr(self, f) or getattr(self, f) < 1:
        errors.append(f"{f} must be a positive integer, got {getattr(self, f)!r}")
    if not errors and self.rollout_batch % self.minibatch:
      errors.append(f"rollout_batch={self.rollout_batch} is not a multiple of minibatch={self.minibatch}")
    if not self.temperature > 0:
      errors.append(f"temperature must be > 0 (PPO samples), got {self.temperature}")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      errors.append(f"top_k must be a non-negative integer, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      errors.append(f"top_p must be in (0, 1], got {self.top_p}")
    if not self.kl_coef >= 0:
      errors.append(f"kl_coef must be >= 0, got {self.kl_coef}")
    if not (self.kl_target > 0 and self.kl_horizon > 0):
      errors.append(f"kl_target and kl_horizon must be > 0, got {self.kl_target}, {self.kl_horizon}")
    if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      errors.append(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
    for f in ("clip_eps", "vf_clip"):
      if not getattr(self, f) > 0:
        errors.append(f"{f} must be > 0, got {getattr(self, f)}")
    if not (self.vf_coef >= 0 and self.entropy_coef >= 0):
      errors.append(f"vf_coef and entropy_coef must be >= 0, got {self.vf_coef}, {self.entropy_coef}")
    if self.reward_clip is not None and not self.reward_clip > 0:
      errors.append(f"reward_clip must be > 0 or None, got {self.reward_clip}")
    if errors:
      raise ValueError("invalid PPOConfig:\n  " + "\n  ".join(errors))

  @property
  def steps_per_iteration(self) -> int:
    return self.ppo_epochs * (self.rollout_batch // self.minibatch)

  def kl_controller(self) -> ppo_math.AdaptiveKLController | ppo_math.FixedKLController:
    if self.adaptive_kl:
      return ppo_math.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
    return ppo_math.FixedKLController(self.kl_coef)


# ---------------------------------------------------------------------------------------------
# Variables layout (the value head under LoRA)


def to_ppo_layout(variables: dict, trainable: str) -> dict:
  """Trained-variables layout: under `trainable="lora"`, params/value_head moves into "lora"."""
  return head_to_lora(variables, VALUE_HEAD) if trainable == "lora" else dict(variables)


def policy_variables(variables: dict) -> dict:
  """`Transformer.apply` variables from the PPO layout (the inverse of `to_ppo_layout`)."""
  return dict(head_to_params(variables, VALUE_HEAD))


# ---------------------------------------------------------------------------------------------
# The forward over a rollout row, and the loss plug-in


def response_outputs(model: Transformer, variables: Any, sequences_BxT: Array, sequence_mask_BxT: Array,
                     n_response: int, temperature: float, rngs: dict | None = None
                     ) -> tuple[Array, Array | None, Array]:
  """One forward over [prompt (P) | response (N)] rows -> (logp_BxN, values_BxN, scaled_logits_BxNxV).

  Response token i (slot P + i) gets the log-prob log_softmax(logits[P + i - 1] / temperature)[token]
  and the value head's output at the same slot P + i - 1 (the state from which the token is sampled).
  `values_BxN` is None for a model without a value head. Entries outside the response mask are finite
  but meaningless.
  """
  T = sequences_BxT.shape[1]
  P = T - n_response
  if P < 1:
    raise ValueError(f"rollout rows of length {T} with {n_response} response slots have no prompt slot")
  out = model.apply(variables, sequences_BxT, sequence_mask_BxT, rngs=rngs)
  scaled_BxNxV = out.logits[:, P - 1:T - 1].astype(jnp.float32) / temperature
  tokens_BxN = sequences_BxT[:, P:]
  logp_BxN = ops._pick(scaled_BxNxV, tokens_BxN) - jax.nn.logsumexp(scaled_BxNxV, axis=-1)
  values_BxN = out.values[:, P - 1:T - 1] if out.values is not None else None
  return logp_BxN, values_BxN, scaled_BxNxV


def ppo_loss(model: Transformer, clip_eps: float, vf_coef: float, vf_clip: float, entropy_coef: float = 0.0,
             *, temperature: float = 1.0) -> Callable:
  """The PPO loss plug-in `(params, frozen, batch, rng) -> (loss, metrics)` for the engine's step.

  `model`: the policy with a value head (`config.value_head=True`, shared backbone). `params` may be in
  the PPO layout (`to_ppo_layout`). `temperature`: the sampling temperature (log-probs are those of
  log_softmax(logits / temperature), as the generator's). Batch (a minibatch of rollout rows):

    sequences, sequence_mask [B, T]        left-padded prompt + response (GenerateOutput layout)
    response_mask            [B, N]        1 on response tokens (up to and including EOS)
    old_logp, old_values     [B, N]        at rollout time (see `response_outputs` for alignment)
    advantages, returns      [B, N]        GAE (advantages whitened over the rollout)

  loss = ppo_policy_loss + vf_coef * ppo_value_loss - entropy_coef * entropy (token means over the
  response mask); `loss_weight` = the number of response tokens, so micro-batches combine into the
  token mean of the whole minibatch.
  """
  if not model.config.value_head:
    raise ValueError("ppo_loss needs a policy with a value head (ModelConfig.value_head=True)")
  if model.config.head != "lm":
    raise ValueError(f"ppo_loss needs a policy with an LM head, got head={model.config.head!r}")
  if not temperature > 0:
    raise ValueError(f"ppo_loss: temperature must be > 0, got {temperature}")

  def loss_fn(params, frozen, batch, rng):
    del frozen
    rngs = None if model.deterministic else {"dropout": rng}
    mask_BxN = batch["response_mask"].astype(jnp.float32)
    logp_BxN, values_BxN, scaled_BxNxV = response_outputs(
        model, policy_variables(params), batch["sequences"], batch["sequence_mask"], mask_BxN.shape[1],
        temperature, rngs)
    pg_loss, pg = ppo_math.ppo_policy_loss(logp_BxN, batch["old_logp"], batch["advantages"], mask_BxN, clip_eps)
    vf_loss, vf = ppo_math.ppo_value_loss(values_BxN, batch["old_values"], batch["returns"], mask_BxN, vf_clip)
    if not entropy_coef:
      scaled_BxNxV = jax.lax.stop_gradient(scaled_BxNxV)
    entropy = ops.masked_mean(ops.entropy_from_logits(scaled_BxNxV), mask_BxN)
    loss = pg_loss + vf_coef * vf_loss - entropy_coef * entropy
    metrics = {
        "policy_loss": pg_loss, "value_loss": vf_loss, "entropy": jax.lax.stop_gradient(entropy),
        "clipfrac": pg["clipfrac"], "approx_kl": pg["approx_kl"], "policy_kl": pg["policy_kl"],
        "ratio": pg["ratio"], "value_clipfrac": vf["clipfrac"], "value_error": vf["error"],
        "value_mean": vf["mean"], "loss_weight": jnp.sum(mask_BxN),
    }
    return loss, metrics

  return loss_fn


def ppo_task(ecfg: Any, mcfg: ModelConfig, spec: dict, *, clip_eps: float, vf_coef: float, vf_clip: float,
             entropy_coef: float = 0.0, temperature: float = 1.0, name: str = "ppo",
             inputs: StageInputs | None = None) -> Task:
  """The PPO minibatch update's task (`ppo_loss`): the policy with a value head, in the PPO layout
  (under LoRA the value head trains in the "lora" collection)."""
  model = Transformer(mcfg)
  trainable = ecfg.trainable
  loss = ppo_loss(model, clip_eps, vf_coef, vf_clip, entropy_coef, temperature=temperature)
  M, T = spec["sequences"].shape
  return make_task(name, loss, to_ppo_layout(abstract_variables(model), trainable),
                   to_ppo_layout(logical_axes(model), trainable), spec,
                   init=lambda rng: to_ppo_layout(init_variables(model, rng), trainable),
                   layout=Layout(to_model=policy_variables, to_trained=lambda v: to_ppo_layout(v, trainable)),
                   model_config=mcfg, tokens_per_step=M * T,
                   flops_per_step=trained_passes(mcfg, trainable) * mcfg.flops_per_token(T) * M * T, inputs=inputs)


def ppo_batch_spec(minibatch: int, prompt_slots: int, max_new_tokens: int) -> dict:
  """The PPO minibatch (`ppo_loss`): rollout rows [M, T = prompt_slots + N], per-response-token fields [M, N]."""
  M, N = int(minibatch), int(max_new_tokens)
  T = int(prompt_slots) + N
  spec = {"sequences": jax.ShapeDtypeStruct((M, T), jnp.int32),
          "sequence_mask": jax.ShapeDtypeStruct((M, T), jnp.int32),
          "response_mask": jax.ShapeDtypeStruct((M, N), jnp.int32)}
  spec.update({k: jax.ShapeDtypeStruct((M, N), jnp.float32) for k in ("old_logp", "old_values", "advantages",
                                                                      "returns")})
  return spec


def rollout_fn(model: Transformer, ref_model: Transformer, *, temperature: float, gamma: float, lam: float,
               whiten_advantages: bool = True) -> Callable:
  """`f(variables, ref_variables, sequences, sequence_mask, response_mask, scores_B, kl_coef)` (jit it)
  -> (train fields, per-token arrays, scalar stats).

  Train fields: old_logp, old_values, advantages, returns [B, N] (the `ppo_loss` batch without the
  rollout tokens). Per-token arrays: rewards (KL penalty on every response token, the score added at
  the last one), ref_logp, kl [B]. Stats: kl (mean per-response KL), non_score_reward (mean per-response
  sum of the penalty), entropy, value_mean, advantage_mean (before whitening), return_mean.
  """

  def f(variables, ref_variables, sequences_BxT, sequence_mask_BxT, response_mask_BxN, scores_B, kl_coef):
    n = response_mask_BxN.shape[1]
    mask_BxN = response_mask_BxN.astype(jnp.float32)
    logp_BxN, values_BxN, scaled_BxNxV = response_outputs(model, variables, sequences_BxT, sequence_mask_BxT,
                                                          n, temperature)
    ref_logp_BxN, _, _ = response_outputs(ref_model, ref_variables, sequences_BxT, sequence_mask_BxT, n,
                                          temperature)
    rewards_BxN = ppo_math.kl_penalized_rewards(scores_B, logp_BxN, ref_logp_BxN, mask_BxN, kl_coef)
    advantages_BxN, returns_BxN = ppo_math.gae(rewards_BxN, values_BxN, mask_BxN, gamma, lam)
    raw_adv_mean = ops.masked_mean(advantages_BxN, mask_BxN)
    if whiten_advantages:
      advantages_BxN = ppo_math.whiten(advantages_BxN, mask_BxN)
    kl_B = ppo_math.sequence_kl(logp_BxN, ref_logp_BxN, mask_BxN)
    train = {"old_logp": logp_BxN * mask_BxN, "old_values": values_BxN * mask_BxN,
             "advantages": advantages_BxN, "returns": returns_BxN}
    arrays = {"rewards": rewards_BxN, "ref_logp": ref_logp_BxN * mask_BxN, "kl": kl_B}
    stats = {"kl": jnp.mean(kl_B), "non_score_reward": -kl_coef * jnp.mean(kl_B),
             "entropy": ops.masked_mean(ops.entropy_from_logits(scaled_BxNxV), mask_BxN),
             "value_mean": ops.masked_mean(values_BxN, mask_BxN), "advantage_mean": raw_adv_mean,
             "return_mean": ops.masked_mean(returns_BxN, mask_BxN)}
    return train, arrays, stats

  return f
