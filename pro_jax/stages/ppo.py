"""MORLHF + PRO with PPO (PRO_METHOD.md stage 5, online): the loss plug-in and the rollout loop.

    result = run_ppo(engine_cfg, "runs/ppo", policy="checkpoint:runs/sft", prompts=train_examples,
                     tokenizer=tok, scorer=scorer, norm=norm_stats, weights=weights_NxK,
                     ppo=PPOConfig(rollout_batch=64, minibatch=16, iterations=200))

One PPO iteration (`ppo_iteration`, the whole algorithm in one function):

1. the next `rollout_batch` prompts of a deterministic, resumable order (`rollout_indices`; the
   position, prompts consumed, is saved with each checkpoint);
2. sample responses with the KV-cache generator (`pro_jax.models.generate`, one compile), rng
   `fold_in(fold_in(key(seed), ROLLOUT_STREAM), iteration)`, so a resumed run draws the same samples;
3. score them with the K objectives on the host, normalize (`NormStats`), scalarize with the
   prompt's own weights: R(x, y) = sum_k w_k(x) r~_k(x, y) (optionally clipped to +-reward_clip);
4. one jitted function (`rollout_fn`): old log-probs and values of the policy, reference log-probs,
   per-token rewards r_t = -kl_coef (logp_t - ref_logp_t) (+ R at the last response token), GAE,
   advantage whitening over the rollout batch;
5. `ppo_epochs` passes over the rollout in shuffled minibatches, each through the engine's ONE
   jitted train step (`pro_jax.train.trainer.setup`: donated, sharded state) with `ppo_loss`;
6. the adaptive KL controller update with the measured KL (mean over the rollout of
   sum_t logp_t - ref_logp_t).

Alignment (docs/ppo.md): a rollout row is `sequences = [left-padded prompt (P) | response (N)]`, as
`GenerateOutput.sequences_BxT`; every per-token array is [B, N] over the response slots. Response
token i sits at slot P + i; its log-prob comes from the logits at slot P + i - 1 and its value is the
value head at the SAME slot P + i - 1 (the state that predicts the token: V(s_i) for action a_i).
Log-probs are taken under log_softmax(logits / temperature), the sampling distribution.

LoRA (`trainable="lora"`): the value head must train with the adapters, so in the trained variables
it rides in the "lora" collection under the key `value_head` (`to_ppo_layout`); `policy_variables`
moves it back into "params" before `Transformer.apply`. The reference is then the frozen base.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax import sharding as shd
from pro_jax.data.pipeline import pad_left, round_up
from pro_jax.data.tokenize import encode, eos_id, normalize_messages, pad_id, truncate_prompt
from pro_jax.models import ModelConfig, Transformer, abstract_variables, init_variables, logical_axes
from pro_jax.models.generate import GenerateOutput, generate
from pro_jax.pro import ops
from pro_jax.pro import ppo as ppo_math
from pro_jax.models.sources import Backbone, derive_config, load_source
from pro_jax.pro.normalize import NormStats
from pro_jax.train import logging as tlog
from pro_jax.train.checkpoint import CHECKPOINTS_DIR, Checkpointer, as_path, base_for_fresh_run, restore_base
from pro_jax.train.config import config_to_dict, model_config_from, validate_config
from pro_jax.train.state import TrainState, init_state, merge_variables, split_variables
from pro_jax.train.trainer import NonFiniteError, Task, _Preemption, prepare_workdir, setup

log = logging.getLogger("pro_jax")

Array = jax.Array
VALUE_HEAD = "value_head"
ROLLOUT_STREAM = 11  # rng stream ids: generation keys, prompt order, minibatch order
PROMPT_STREAM = 12
MINIBATCH_STREAM = 13
BATCH_FIELDS = ("sequences", "sequence_mask", "response_mask", "old_logp", "old_values", "advantages", "returns")


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
  if trainable != "lora":
    return dict(variables)
  params = dict(variables["params"])
  value_head = params.pop(VALUE_HEAD)
  return {"params": params, "lora": dict(variables["lora"], **{VALUE_HEAD: value_head})}


def policy_variables(variables: dict) -> dict:
  """`Transformer.apply` variables from the PPO layout (the inverse of `to_ppo_layout`)."""
  lora = variables.get("lora")
  if not lora or VALUE_HEAD not in lora:
    return dict(variables)
  lora = dict(lora)
  params = dict(variables["params"], **{VALUE_HEAD: lora.pop(VALUE_HEAD)})
  return {"params": params, "lora": lora}


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


# ---------------------------------------------------------------------------------------------
# Host-side pieces: prompt order, prompt tokens, scalarized rewards


def rollout_indices(num_prompts: int, rollout_batch: int, seed: int, position: int) -> np.ndarray:
  """The `rollout_batch` prompt indices at `position` (prompts consumed so far) of the endless stream
  made of one fresh permutation of the prompts per epoch (`default_rng([seed, PROMPT_STREAM, epoch])`)."""
  out: list[np.ndarray] = []
  pos, need = position, rollout_batch
  while need:
    epoch, offset = divmod(pos, num_prompts)
    perm = np.random.default_rng([seed, PROMPT_STREAM, epoch]).permutation(num_prompts)
    take = min(need, num_prompts - offset)
    out.append(perm[offset:offset + take])
    pos, need = pos + take, need - take
  return np.concatenate(out)


def prompt_arrays(tokenizer: Any, prompts: Sequence[Any], max_prompt_len: int, template: str = "auto"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (tokens, mask) [N, round_up(max_prompt_len, 8)]; prompts cut from the left (BOS kept)."""
  messages = [normalize_messages(p, row=i) for i, p in enumerate(prompts)]
  ids, _ = encode(tokenizer, messages, None, template)
  bos = getattr(tokenizer, "bos_token_id", None)
  rows = [np.asarray(truncate_prompt(i, max_prompt_len, bos), np.int32) for i in ids]
  empty = [i for i, r in enumerate(rows) if len(r) == 0]
  if empty:
    raise ValueError(f"prompts: row {empty[0]} renders to no token (every prompt needs at least one)")
  return pad_left(rows, round_up(max_prompt_len, 8), pad_id(tokenizer))


def scalarize(raw_NxK: np.ndarray, norm: NormStats, weights_NxK: np.ndarray, reward_clip: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """(R [N], r~ [N, K]): R = sum_k w_k r~_k with r~ = norm.apply(raw), clipped to +-reward_clip."""
  normed = np.asarray(norm.apply(np.asarray(raw_NxK, np.float64)), np.float64)
  r = np.sum(np.asarray(weights_NxK, np.float64) * normed, axis=1)
  if reward_clip is not None:
    r = np.clip(r, -reward_clip, reward_clip)
  return r.astype(np.float32), normed.astype(np.float32)


def decode_responses(tokenizer: Any, tokens_BxN: np.ndarray, mask_BxN: np.ndarray, eos: int) -> list[str]:
  """Response texts: the masked tokens without EOS, special tokens skipped, stripped."""
  ids = [[int(t) for t, m in zip(row, mrow) if m and t != eos] for row, mrow in zip(tokens_BxN, mask_BxN)]
  return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _to_host(x: Any) -> Any:
  """A (global) device array / pytree as numpy, gathered from every process on multi-host runs."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(np.asarray, jax.device_get(x))


# ---------------------------------------------------------------------------------------------
# The run: everything an iteration needs


@dataclasses.dataclass
class PPOResult:
  state: TrainState
  iteration: int  # iterations completed (== the last checkpoint's step)
  status: str  # "done" | "preempted"
  history: list[dict]  # per-iteration metrics of this call (host floats)
  kl_coef: float
  resumed_from: int | None
  compiles: dict[str, int]  # traces of the train step / rollout function in this process (1 = once)


@dataclasses.dataclass
class _Run:
  """The fixed context of a run (built once by `run_ppo`)."""

  cfg: Any
  ppo: PPOConfig
  mesh: Any
  rules: Any
  model: Transformer
  gen_model: Transformer
  step: Any  # the engine's TrainStep
  prepare: Callable  # jitted `rollout_fn`
  frozen: dict  # {"base": non-trainable variables}
  ref_variables: Any
  prompts: list
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  weights: np.ndarray
  tokenizer: Any
  scorer: Any
  norm: NormStats
  controller: Any
  seed: int
  eos: int
  pad: int

  def to_global(self, x: np.ndarray) -> Array:
    """A global array (rows over the (data, fsdp) axes) from a full host batch."""
    rows = shd.host_batch_rows(x.shape[0], self.mesh)
    return shd.host_local_to_global(x[rows], self.mesh, x.shape[0])


def ppo_iteration(run: _Run, state: TrainState, kl_state: ppo_math.KLState, iteration: int, position: int
                  ) -> tuple[TrainState, ppo_math.KLState, dict]:
  """One PPO iteration (0-based `iteration`; `position` = prompts consumed before it): rollout, rewards,
  advantages, `ppo_epochs` x minibatch updates through the engine's step, KL control."""
  p = run.ppo
  t0 = time.perf_counter()
  # 1. the next rollout batch of prompts, and their weights w(x)
  idx = rollout_indices(len(run.prompts), p.rollout_batch, run.seed, position)
  weights_BxK = run.weights[idx]
  variables = policy_variables(merge_variables(state.params, run.frozen["base"]))

  # 2. sample responses (one compile: static shapes and settings; the rng depends only on the iteration)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(run.seed), ROLLOUT_STREAM), iteration)
  with shd.activation_sharding(run.mesh, run.rules):
    gen: GenerateOutput = generate(
        run.gen_model, variables, run.to_global(run.prompt_tokens[idx]), run.to_global(run.prompt_mask[idx]),
        max_new_tokens=p.max_new_tokens, rng=rng, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        eos_token_id=run.eos, pad_token_id=run.pad)
  tokens_BxN, response_mask_BxN, gen_logp_BxN = _to_host((gen.tokens_BxN, gen.response_mask_BxN,
                                                          gen.logprobs_BxN))
  t_gen = time.perf_counter()

  # 3. K rewards on the host -> normalized -> scalarized with the prompt's weights
  texts = decode_responses(run.tokenizer, tokens_BxN, response_mask_BxN, run.eos)
  raw_BxK = np.asarray(run.scorer.score([run.prompts[i] for i in idx], texts), np.float32)
  if raw_BxK.shape != weights_BxK.shape:
    raise ValueError(f"scorer returned rewards of shape {raw_BxK.shape}, expected {weights_BxK.shape}")
  scores_B, normed_BxK = scalarize(raw_BxK, run.norm, weights_BxK, p.reward_clip)
  t_score = time.perf_counter()

  # 4. old log-probs / values / reference log-probs, KL-penalized rewards, GAE (one jitted call)
  with shd.activation_sharding(run.mesh, run.rules):
    train_fields, _, stats = run.prepare(variables, run.ref_variables, gen.sequences_BxT, gen.sequence_mask_BxT,
                                         gen.response_mask_BxN, run.to_global(scores_B), np.float32(kl_state.kl_coef))
  rollout = _to_host(dict(train_fields, sequences=gen.sequences_BxT, sequence_mask=gen.sequence_mask_BxT,
                          response_mask=gen.response_mask_BxN))
  stats = _to_host(stats)
  t_prep = time.perf_counter()

  # 5. ppo_epochs passes of shuffled minibatches through the engine's one jitted step
  order_rng = np.random.default_rng([run.seed, MINIBATCH_STREAM, iteration])
  M = p.minibatch
  step_metrics = []
  for _ in range(p.ppo_epochs):
    perm = order_rng.permutation(p.rollout_batch)
    for start in range(0, p.rollout_batch, M):
      rows = perm[start:start + M]
      batch = {k: run.to_global(rollout[k][rows]) for k in BATCH_FIELDS}
      state, m = run.step(state, run.frozen, batch)
      step_metrics.append(m)
  step_metrics = jax.device_get(step_metrics)  # the only sync of the update phase
  t_train = time.perf_counter()

  # 6. adaptive KL control with the measured KL of this rollout
  kl_coef_used = float(kl_state.kl_coef)
  kl_state = run.controller.update(kl_state, stats["kl"], p.rollout_batch)

  mask = response_mask_BxN.astype(bool)
  lengths = mask.sum(1)
  tokens_trained = p.ppo_epochs * p.rollout_batch * rollout["sequences"].shape[1]
  metrics = {f"ppo/{k}": float(np.mean([float(m[k]) for m in step_metrics])) for k in step_metrics[0]
             if k not in ("loss_weight", "nonfinite")}
  metrics["ppo/nonfinite_steps"] = float(sum(float(m["nonfinite"]) for m in step_metrics))
  metrics.update({
      "reward/scalarized": float(scores_B.mean()), "kl": float(stats["kl"]), "kl_coef": kl_coef_used,
      "non_score_reward": float(stats["non_score_reward"]), "entropy": float(stats["entropy"]),
      "value_mean": float(stats["value_mean"]), "advantage_mean": float(stats["advantage_mean"]),
      "return_mean": float(stats["return_mean"]),
      "response_length": float(lengths.mean()),
      "eos_fraction": float(np.mean(np.any(mask & (tokens_BxN == run.eos), axis=1))),
      # teacher-forced old log-probs vs the generator's (KV cache): ~0 when the alignment is right
      "logp_gen_abs_diff": float(np.abs(rollout["old_logp"] - gen_logp_BxN)[mask].mean()),
      "time/generate_s": t_gen - t0, "time/score_s": t_score - t_gen, "time/prepare_s": t_prep - t_score,
      "time/train_s": t_train - t_prep, "time/iteration_s": t_train - t0,
      "gen_tokens_per_s": float(lengths.sum()) / max(t_gen - t0, 1e-9),
      "train_tokens_per_s": tokens_trained / max(t_train - t_prep, 1e-9),
  })
  for k, name in enumerate(run.norm.objectives):
    metrics[f"reward/raw/{name}"] = float(raw_BxK[:, k].mean())
    metrics[f"reward/norm/{name}"] = float(normed_BxK[:, k].mean())
  return state, kl_state, metrics


# ---------------------------------------------------------------------------------------------
# run_ppo


@dataclasses.dataclass
class _Compiled:
  """The jitted functions of a run; identical runs in one process (e.g. a sweep over weight sources)
  share them, so each compiles once per process. `traces` counts how often each was traced."""

  setup: Any  # pro_jax.train.trainer.Setup (its `step` is the engine's one jitted train step)
  prepare: Callable  # jitted `rollout_fn`
  init_policy: Callable  # (backbone params, rng) -> PPO-layout variables, sharded
  init_state: Callable  # (trainable, rng) -> TrainState, sharded
  ref_shardings: Any
  traces: dict[str, int]


_COMPILED: dict[Any, _Compiled] = {}
_COMPILED_MAX = 4


def _compiled(cfg: Any, cfg_json: dict, mcfg: ModelConfig, ref_cfg: ModelConfig, p: PPOConfig, T: int,
              mesh: Any) -> _Compiled:
  key = (json.dumps(cfg_json, sort_keys=True), mcfg, ref_cfg, p, T, mesh)
  if key in _COMPILED:
    return _COMPILED[key]
  model, ref_model = Transformer(mcfg), Transformer(ref_cfg)
  traces = {"train_step": 0, "rollout": 0}
  loss = ppo_loss(model, p.clip_eps, p.vf_coef, p.vf_clip, p.entropy_coef, temperature=p.temperature)

  def counted_loss(*args):
    traces["train_step"] += 1  # Python side effect: runs only while tracing
    return loss(*args)

  M, N = p.minibatch, p.max_new_tokens
  spec = {k: jax.ShapeDtypeStruct((M, T), jnp.int32) for k in ("sequences", "sequence_mask")}
  spec["response_mask"] = jax.ShapeDtypeStruct((M, N), jnp.int32)
  spec.update({k: jax.ShapeDtypeStruct((M, N), jnp.float32) for k in ("old_logp", "old_values", "advantages",
                                                                      "returns")})
  abstract = to_ppo_layout(abstract_variables(model), cfg.trainable)
  axes = to_ppo_layout(logical_axes(model), cfg.trainable)
  task = Task(loss_fn=counted_loss, abstract_variables=abstract, logical_axes=axes, init_variables=None,
              batch_spec=spec, model_config=mcfg, name="ppo")
  su = setup(cfg, task, mesh)
  prepare = rollout_fn(model, ref_model, temperature=p.temperature, gamma=p.gamma, lam=p.lam,
                       whiten_advantages=p.whiten_advantages)

  def counted_prepare(*args):
    traces["rollout"] += 1
    return prepare(*args)

  var_sh = shd.param_shardings(axes, abstract, mesh, su.rules)
  std_sh = policy_variables(var_sh)  # the same shardings in the Transformer layout
  fresh = jax.jit(lambda rng: init_variables(model, rng), out_shardings=std_sh)

  def init_policy(backbone_params: Any, rng: Array) -> dict:
    """Fresh variables (value head, LoRA) with every backbone parameter copied in (graft, sharded)."""
    variables = fresh(rng)
    params = dict(variables["params"])
    for name, value in backbone_params.items():
      if name not in params:
        continue  # e.g. a head the policy does not have
      mine, sh = params[name], std_sh["params"][name]
      if jax.tree.structure(mine) != jax.tree.structure(value) or any(
          a.shape != np.shape(b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(value))):
        raise ValueError(f"policy parameter {name!r} does not fit the PPO model (different shapes)")
      params[name] = jax.tree.map(lambda a, b, s: jax.device_put(b, s).astype(a.dtype), mine, value, sh)
    return to_ppo_layout(dict(variables, params=params), cfg.trainable)

  ref_abstract = abstract_variables(ref_model)["params"]
  fns = _Compiled(
      setup=su, prepare=jax.jit(counted_prepare), init_policy=init_policy,
      init_state=jax.jit(lambda t, r: init_state(t, su.optimizer, r), out_shardings=su.state_shardings),
      ref_shardings=shd.param_shardings(logical_axes(ref_model)["params"], ref_abstract, mesh, su.rules),
      traces=traces)
  if len(_COMPILED) >= _COMPILED_MAX:
    _COMPILED.pop(next(iter(_COMPILED)))
  _COMPILED[key] = fns
  return fns


def _policy_backbone(policy: str | tuple) -> Backbone:
  if isinstance(policy, str):
    bb = load_source(policy)
    if bb.config is None:
      raise ValueError(f"run_ppo: policy={policy!r} holds no weights (PPO starts from an SFT policy)")
    return bb
  try:
    config, params = policy
  except (TypeError, ValueError):
    raise TypeError("run_ppo: policy must be a source string ('checkpoint:DIR', 'hf:DIR', 'llama2c:FILE') "
                    "or a (ModelConfig, params) pair") from None
  if not isinstance(config, ModelConfig):
    raise TypeError(f"run_ppo: policy[0] must be a ModelConfig, got {type(config).__name__}")
  params = params["params"] if isinstance(params, dict) and "params" in params else params
  return Backbone(config, params, "given")


def _check_inputs(prompts, weights, scorer, norm) -> tuple[list, np.ndarray]:
  if not len(prompts):
    raise ValueError("run_ppo: no prompts")
  out = []
  for i, ex in enumerate(prompts):
    if isinstance(ex, dict) and "role" not in ex:
      if "prompt" not in ex:
        raise ValueError(f"prompts: row {i} (id {ex.get('id', '?')!r}) has no field 'prompt'")
      out.append(ex["prompt"])
    else:
      out.append(ex)
  objectives = tuple(scorer.objectives)
  if tuple(norm.objectives) != objectives:
    raise ValueError(f"norm statistics are for objectives {list(norm.objectives)}, the scorer gives "
                     f"{list(objectives)}")
  w = np.asarray(weights, np.float32)
  if w.shape != (len(out), len(objectives)):
    raise ValueError(f"weights: shape {w.shape}, expected [num prompts, K] = {(len(out), len(objectives))}")
  bad = np.flatnonzero(~np.all(np.isfinite(w) & (w >= 0), axis=1))
  if bad.size:
    raise ValueError(f"weights: row {int(bad[0])} = {w[bad[0]].tolist()} is not finite and non-negative")
  return out, w


def run_ppo(engine_cfg: Any, workdir: str | os.PathLike, *, policy: str | tuple, prompts: Sequence[Any],
            tokenizer: Any, scorer: Any, norm: NormStats, weights: np.ndarray, ppo: PPOConfig = PPOConfig(),
            reference: tuple | None = None, mesh: Any = None, existing: str = "auto",
            on_event: Callable[[str, int], None] | None = None, extra: dict | None = None) -> PPOResult:
  """MORLHF + PRO with PPO, run (or resumed) to `ppo.iterations` iterations. See the module docstring.

  Args:
    engine_cfg: the engine config (`pro_jax.configs.base.base_config()` layout): seed, optim, mesh,
      sharding, n_micro, trainable ("full" or "lora"), model (its dtype / param_dtype / remat /
      scan_layers / lora are applied to the policy), guards, checkpoint (every_steps counts
      ITERATIONS), log. Its batch_size and total_steps are set from `ppo` (minibatch, and iterations x
      ppo_epochs x rollout_batch / minibatch for the learning-rate schedule).
    workdir: run directory (config.json, checkpoints/<iteration>, metrics.jsonl, base/ under LoRA).
    policy: the SFT policy: a source string ("checkpoint:DIR", "hf:DIR", "llama2c:FILE") or a
      (ModelConfig, params) pair; a fresh value head is grafted on it.
    prompts: schema examples (dicts with "prompt") or bare prompts (message lists / strings).
    tokenizer: the policy's tokenizer (HF-style: encode / batch_decode, eos_token_id).
    scorer: any object with `objectives` (K names) and `score(prompts, responses) -> [N, K]`.
    norm: normalization statistics of the K objectives (`NormStats`, objectives in the scorer's order).
    weights: [N, K] per-prompt weights w(x) (`resolve_example_weights`: target / adapter / fixed / uniform).
    ppo: `PPOConfig`.
    reference: the frozen reference as a (ModelConfig, params) pair; None = the initial policy (the SFT
      model; under LoRA the base params, so no second copy).
    mesh: default `mesh_from_config(engine_cfg.mesh)`.
    existing: "auto" / "resume" / "overwrite" (the engine's workdir guard; the PPO config is part of it).
    on_event(name, iteration): hook called at "iteration_done", "save_started" and "preempted".
    extra: JSON-able metadata saved with every checkpoint (e.g. the pipeline's weights_source).
  """
  event = on_event or (lambda name, it: None)
  ppo.check()
  prompt_list, weights_NxK = _check_inputs(prompts, weights, scorer, norm)
  cfg = copy.deepcopy(engine_cfg)
  cfg.batch_size = ppo.minibatch
  cfg.total_steps = ppo.iterations * ppo.steps_per_iteration
  validate_config(cfg)
  if cfg.trainable not in ("full", "lora"):
    raise ValueError(f"run_ppo: trainable must be 'full' or 'lora', got {cfg.trainable!r}")
  mesh = mesh if mesh is not None else shd.mesh_from_config(cfg.mesh)
  dp = shd.data_parallel_size(mesh)
  if ppo.rollout_batch % dp:
    raise ValueError(f"rollout_batch={ppo.rollout_batch} is not divisible by the data-parallel size {dp}")
  seed = int(cfg.seed)

  # the policy: the SFT model's architecture + a value head (+ LoRA), grafted from its weights
  bb = _policy_backbone(policy)
  stage_model = model_config_from(cfg.model)
  lora = stage_model.lora if cfg.trainable == "lora" else None
  mcfg = derive_config(bb, stage_model, head="lm", value_head=True, lora=lora, dtype=stage_model.dtype,
                       param_dtype=stage_model.param_dtype, remat=stage_model.remat,
                       scan_layers=stage_model.scan_layers, attention_impl=stage_model.attention_impl)
  model = Transformer(mcfg)
  gen_model = Transformer(mcfg.replace(value_head=False))
  ref_cfg = (reference[0] if reference is not None else mcfg).replace(value_head=False, lora=None, head="lm")
  eos, pad = eos_id(tokenizer), pad_id(tokenizer)
  prompt_tokens, prompt_mask = prompt_arrays(tokenizer, prompt_list, ppo.max_prompt_len, ppo.template)
  T = prompt_tokens.shape[1] + ppo.max_new_tokens
  if T > mcfg.max_seq_len:
    raise ValueError(f"prompt slots {prompt_tokens.shape[1]} + max_new_tokens {ppo.max_new_tokens} = {T} exceed "
                     f"the policy's max_seq_len {mcfg.max_seq_len}")

  # the engine's step with the PPO loss, the rollout function, the initializers (cached per process)
  cfg_json = dict(config_to_dict(cfg), ppo=dataclasses.asdict(ppo))
  fns = _compiled(cfg, cfg_json, mcfg, ref_cfg, ppo, T, mesh)
  su = fns.setup
  workdir = as_path(workdir)
  prepare_workdir(workdir, cfg_json, existing)

  # initial variables (also the reference when none is given), then restore or initialize the state
  variables0 = fns.init_policy(bb.params, jax.random.PRNGKey(seed))
  trainable0, base = split_variables(variables0, cfg.trainable)
  ckpt = Checkpointer(workdir / CHECKPOINTS_DIR, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  controller = ppo.kl_controller()
  resumed_from = None
  if ckpt.all_steps():
    restored = ckpt.restore(su.abstract_state)
    state, start = restored.state, restored.step
    consumed = int((restored.data_state or {}).get("prompts_consumed", start * ppo.rollout_batch))
    info = (restored.extra or {}).get("ppo", {})
    if info.get("iteration") != start:
      raise ValueError(f"{ckpt.directory}/{start}: not a PPO checkpoint (extra.ppo.iteration missing or "
                       f"{info.get('iteration')!r} != {start})")
    kl_state = ppo_math.KLState(jnp.asarray(info["kl_coef"], jnp.float32))
    if jax.tree.leaves(su.base_abstract):
      base = restore_base(workdir, su.base_abstract)
      if base is None:
        raise FileNotFoundError(f"{workdir}/base is missing: cannot resume a {cfg.trainable} run without it")
    resumed_from = start
    log.info("ppo: resumed from iteration %d (%s)", start, ckpt.directory)
  else:
    base = base_for_fresh_run(workdir, base, su.base_abstract)
    state = fns.init_state(trainable0, jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    kl_state = controller.init()
    start = consumed = 0
  if reference is not None:
    ref_params = reference[1]["params"] if "params" in reference[1] else reference[1]
    ref_variables = {"params": jax.tree.map(lambda x, s: jax.device_put(x, s),
                                            {k: ref_params[k] for k in fns.ref_shardings}, fns.ref_shardings)}
  elif cfg.trainable == "lora":
    ref_variables = {"params": base["params"]}
  else:  # the initial (SFT) params; init_state did not donate them
    ref_variables = {"params": {k: v for k, v in variables0["params"].items() if k != VALUE_HEAD}}
  del variables0, trainable0

  run = _Run(cfg=cfg, ppo=ppo, mesh=mesh, rules=su.rules, model=model, gen_model=gen_model, step=su.step,
             prepare=fns.prepare, frozen={"base": base}, ref_variables=ref_variables,
             prompts=prompt_list, prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, weights=weights_NxK,
             tokenizer=tokenizer, scorer=scorer, norm=norm, controller=controller, seed=seed, eos=eos, pad=pad)
  meta = {"config": cfg_json, "trainable": cfg.trainable,
          # under LoRA the value head rides in the "lora" collection: the saved config is the plain policy
          "model_config": (mcfg.replace(value_head=False) if cfg.trainable == "lora" else mcfg).to_dict()}
  logger = tlog.MetricsLogger(workdir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project or None,
                              config=cfg_json, resume_step=start)
  bar = tlog.ProgressBar(ppo.iterations, desc="ppo", initial=start, disable=None if cfg.log.progress else True)
  history: list[dict] = []
  status, it = "done", start

  def save(done: int, position: int):
    event("save_started", done)
    meta_extra = dict(extra or {})
    meta_extra.update({"ppo": {"iteration": done, "kl_coef": float(kl_state.kl_coef), "prompts_consumed": position},
                       "norm": norm.to_dict(), "objectives": list(norm.objectives)})
    ckpt.save(done, state, data_state={"prompts_consumed": position}, extra=meta_extra, meta=meta)

  try:
    with _Preemption() as preempt:
      for it in range(start, ppo.iterations):
        position = consumed + (it - start) * ppo.rollout_batch
        state, kl_state, metrics = ppo_iteration(run, state, kl_state, it, position)
        done = it + 1
        if metrics["ppo/nonfinite_steps"] and cfg.guards.nonfinite == "stop":
          raise NonFiniteError(f"ppo iteration {done}: non-finite loss or gradient (guards.nonfinite='stop')")
        metrics["kl_coef_next"] = float(kl_state.kl_coef)
        logger.log(done, metrics)
        history.append(dict(metrics, iteration=done))
        bar.update(done, loss=metrics["ppo/loss"], tokens=metrics["response_length"] * ppo.rollout_batch,
                   extra={"R": metrics["reward/scalarized"], "kl": metrics["kl"]})
        event("iteration_done", done)
        stop = preempt.reached(done)
        if done % cfg.checkpoint.every_steps == 0 or done == ppo.iterations or stop:
          save(done, position + ppo.rollout_batch)
        it = done
        if stop:
          status = "preempted"
          event("preempted", done)
          break
    ckpt.wait()
  finally:
    bar.close()
    logger.close()
    ckpt.close()
  return PPOResult(state=state, iteration=it, status=status, history=history, kl_coef=float(kl_state.kl_coef),
                   resumed_from=resumed_from, compiles=dict(fns.traces))


__all__ = ["PPOConfig", "PPOResult", "ppo_loss", "rollout_fn", "response_outputs", "run_ppo", "ppo_iteration",
           "rollout_indices", "prompt_arrays", "scalarize", "decode_responses", "policy_variables",
           "to_ppo_layout"]
