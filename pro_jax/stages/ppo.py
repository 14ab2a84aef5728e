"""MORLHF + PRO with PPO (PRO_METHOD.md stage 5, online): the loss plug-in and the rollout loop.

    result = run_ppo(engine_cfg, "runs/ppo", policy="checkpoint:runs/sft", prompts=train_examples,
                     tokenizer=tok, scorer=scorer, norm=norm_stats, weights=weights_NxK,
                     ppo=PPOConfig(rollout_batch=64, minibatch=16, iterations=200))

One PPO iteration (`ppo_iteration`, the whole algorithm in one function; the run around it, restore, logs,
SIGTERM, non-finite guard and checkpoints, is the engine's `pro_jax.train.loop.RunLoop`):

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
it rides in the "lora" collection under the key `value_head` (`to_ppo_layout`, `pro_jax.models.heads`);
`policy_variables` moves it back into "params" before `Transformer.apply`. The reference is then the
frozen base.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from pro_jax import sharding
from pro_jax.data.pipeline import prompt_arrays
from pro_jax.data.tokenize import decode_responses, eos_id, pad_id
from pro_jax.models import ModelConfig, Transformer, abstract_variables, logical_axes
from pro_jax.models.generate import GenerateOutput, generate
from pro_jax.models.sources import Backbone, derive_config, load_source
from pro_jax.pro import ppo as ppo_math
from pro_jax.pro.normalize import NormStats
from pro_jax.stages.ppo_loss import (VALUE_HEAD, PPOConfig, policy_variables, ppo_batch_spec, ppo_loss,  # noqa: F401
                                     ppo_task, response_outputs, rollout_fn, to_ppo_layout)
from pro_jax.stages.stage import StageInputs
from pro_jax.train.config import config_to_dict, model_config_from, validate_config
from pro_jax.train.loop import RunLoop, StepOutput
from pro_jax.train.state import TrainState, merge_variables
from pro_jax.train.trainer import setup

log = logging.getLogger("pro_jax")

Array = jax.Array
ROLLOUT_STREAM = 11  # rng stream ids: generation keys, prompt order, minibatch order
PROMPT_STREAM = 12
MINIBATCH_STREAM = 13
BATCH_FIELDS = ("sequences", "sequence_mask", "response_mask", "old_logp", "old_values", "advantages", "returns")


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


def scalarize(raw_NxK: np.ndarray, norm: NormStats, weights_NxK: np.ndarray, reward_clip: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """(R [N], r~ [N, K]): R = sum_k w_k r~_k with r~ = norm.apply(raw), clipped to +-reward_clip."""
  normed = np.asarray(norm.apply(np.asarray(raw_NxK, np.float64)), np.float64)
  r = np.sum(np.asarray(weights_NxK, np.float64) * normed, axis=1)
  if reward_clip is not None:
    r = np.clip(r, -reward_clip, reward_clip)
  return r.astype(np.float32), normed.astype(np.float32)


def _to_host(x: Any) -> Any:
  """A (global) device array / pytree as numpy, gathered from every process on multi-host runs."""
  if jax.process_count() > 1:
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
  compiles: dict[str, int]  # traces of the train step / rollout function in this run (1 = once)

  @property
  def step(self) -> int:
    return self.iteration


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
    rows = sharding.host_batch_rows(x.shape[0], self.mesh)
    return sharding.host_local_to_global(x[rows], self.mesh, x.shape[0])


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
  with sharding.activation_sharding(run.mesh, run.rules):
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
  with sharding.activation_sharding(run.mesh, run.rules):
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


def _policy_backbone(policy: str | tuple) -> Backbone:
  if isinstance(policy, str):
    bb = load_source(policy)
    if bb.config is None:
      raise ValueError(f"run_ppo: policy={policy!r} holds no weights (PPO starts from an SFT policy)")
    return bb
  try:
    config, params = policy
  except (TypeError, ValueError):
    raise TypeError("run_ppo: policy must be a source string ('checkpoint:DIR', 'hf:DIR', 'llama2c:FILE', "
                    "'gguf:FILE') "
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
    policy: the SFT policy: a source string ("checkpoint:DIR", "hf:DIR", "llama2c:FILE", "gguf:FILE") or a
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
  mesh = mesh if mesh is not None else sharding.mesh_from_config(cfg.mesh)
  dp = sharding.data_parallel_size(mesh)
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
  ref_cfg = (reference[0] if reference is not None else mcfg).replace(value_head=False, lora=None, head="lm")
  prompt_tokens, prompt_mask = prompt_arrays(tokenizer, prompt_list, ppo.max_prompt_len, ppo.template)
  T = prompt_tokens.shape[1] + ppo.max_new_tokens
  if T > mcfg.max_seq_len:
    raise ValueError(f"prompt slots {prompt_tokens.shape[1]} + max_new_tokens {ppo.max_new_tokens} = {T} exceed "
                     f"the policy's max_seq_len {mcfg.max_seq_len}")

  # the engine's step with the PPO loss (the stage's one task builder, as `pro-jax aot` compiles it) and
  # the rollout function; `traces` counts how often each is traced (1 = compiled once for the run)
  traces = {"train_step": 0, "rollout": 0}
  task = ppo_task(cfg, mcfg, ppo_batch_spec(ppo.minibatch, prompt_tokens.shape[1], ppo.max_new_tokens),
                  clip_eps=ppo.clip_eps, vf_coef=ppo.vf_coef, vf_clip=ppo.vf_clip, entropy_coef=ppo.entropy_coef,
                  temperature=ppo.temperature, inputs=StageInputs(init=bb.params))
  task = dataclasses.replace(task, loss_fn=_counted(task.loss_fn, traces, "train_step"))
  su = setup(cfg, task, mesh)
  prepare = rollout_fn(Transformer(mcfg), Transformer(ref_cfg), temperature=ppo.temperature, gamma=ppo.gamma,
                       lam=ppo.lam, whiten_advantages=ppo.whiten_advantages)
  cfg_json = dict(config_to_dict(cfg), ppo=dataclasses.asdict(ppo))
  meta = {"config": cfg_json, "trainable": cfg.trainable,
          # under LoRA the value head rides in the "lora" collection: the saved config is the plain policy
          "model_config": (mcfg.replace(value_head=False) if cfg.trainable == "lora" else mcfg).to_dict()}
  loop = RunLoop(cfg, workdir, su, cfg_json=cfg_json, meta=meta, total=ppo.iterations, desc="ppo",
                 existing=existing, unit="iteration", on_event=on_event)

  # initial variables (also the reference when none is given), then restore or initialize the state
  var_sh = sharding.param_shardings(task.logical_axes, task.abstract_variables, mesh, su.rules)
  variables0 = task.init_variables(jax.random.PRNGKey(seed), shardings=var_sh)
  controller = ppo.kl_controller()
  run_state = {"kl": controller.init(), "consumed": 0}

  def on_restore(restored):
    start = restored.step
    info = (restored.extra or {}).get("ppo", {})
    if info.get("iteration") != start:
      raise ValueError(f"{loop.ckpt.directory}/{start}: not a PPO checkpoint (extra.ppo.iteration missing or "
                       f"{info.get('iteration')!r} != {start})")
    run_state["kl"] = ppo_math.KLState(jnp.asarray(info["kl_coef"], jnp.float32))
    run_state["consumed"] = int((restored.data_state or {}).get("prompts_consumed", start * ppo.rollout_batch))

  loop.restore_or_init(lambda v=variables0: v, on_restore=on_restore, donate=False)  # variables0: the reference
  if reference is not None:
    ref_model = Transformer(ref_cfg)
    ref_shardings = sharding.param_shardings(logical_axes(ref_model)["params"], abstract_variables(ref_model)["params"],
                                             mesh, su.rules)
    ref_params = reference[1]["params"] if "params" in reference[1] else reference[1]
    ref_variables = {"params": jax.tree.map(lambda x, s: jax.device_put(x, s),
                                            {k: ref_params[k] for k in ref_shardings}, ref_shardings)}
  elif cfg.trainable == "lora":
    ref_variables = {"params": loop.base["params"]}
  else:  # the initial (SFT) params; the state's init did not donate them
    ref_variables = {"params": {k: v for k, v in variables0["params"].items() if k != VALUE_HEAD}}
  del variables0

  run = _Run(cfg=cfg, ppo=ppo, mesh=mesh, rules=su.rules, model=Transformer(mcfg),
             gen_model=Transformer(mcfg.replace(value_head=False)), step=su.step,
             prepare=jax.jit(_counted(prepare, traces, "rollout")), frozen={"base": loop.base},
             ref_variables=ref_variables, prompts=prompt_list, prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
             weights=weights_NxK, tokenizer=tokenizer, scorer=scorer, norm=norm, controller=controller, seed=seed,
             eos=eos_id(tokenizer), pad=pad_id(tokenizer))
  start, history = loop.start, []

  def position(done: int) -> int:
    """Prompts consumed after `done` iterations."""
    return run_state["consumed"] + (done - start) * ppo.rollout_batch

  def body(done: int) -> StepOutput:
    loop.state, run_state["kl"], metrics = ppo_iteration(run, loop.state, run_state["kl"], done - 1,
                                                         position(done - 1))
    metrics["kl_coef_next"] = float(run_state["kl"].kl_coef)
    history.append(dict(metrics, iteration=done))
    event("iteration_done", done)
    bar = dict(loss=metrics["ppo/loss"], tokens=metrics["response_length"] * ppo.rollout_batch,
               extra={"R": metrics["reward/scalarized"], "kl": metrics["kl"]})
    return StepOutput(log=metrics, bar=bar, nonfinite=metrics["ppo/nonfinite_steps"])

  def checkpoint(done: int):
    meta_extra = dict(extra or {})
    meta_extra.update({"ppo": {"iteration": done, "kl_coef": float(run_state["kl"].kl_coef),
                               "prompts_consumed": position(done)},
                       "norm": norm.to_dict(), "objectives": list(norm.objectives)})
    return {"prompts_consumed": position(done)}, meta_extra, None

  result = loop.run(body, checkpoint=checkpoint)
  return PPOResult(state=result.state, iteration=result.step, status=result.status, history=history,
                   kl_coef=float(run_state["kl"].kl_coef), resumed_from=result.resumed_from, compiles=dict(traces))


def _counted(fn: Callable, traces: dict, name: str) -> Callable:
  """`fn` counting its calls in `traces[name]` (a Python side effect: inside jit, one per trace)."""

  def counted(*args):
    traces[name] += 1
    return fn(*args)

  return counted


__all__ = ["PPOConfig", "PPOResult", "ppo_loss", "ppo_task", "ppo_batch_spec", "rollout_fn", "response_outputs",
           "run_ppo", "ppo_iteration", "rollout_indices", "prompt_arrays", "scalarize", "decode_responses",
           "policy_variables", "to_ppo_layout"]
