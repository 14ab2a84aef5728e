"""The engine `Task` of a PRO stage from its config ALONE, for `pro-jax aot` (no weights, data, tokenizer).

    engine_cfg, task_fn, what = aot_target(cfg, "policy")   # cfg: a `pro_config()`-style config
    report = pro_jax.train.aot.aot_compile(engine_cfg, "v5e:4x4", task_fn)

Each stage has ONE task builder (`policy.sft_task`, `rm.rm_task`, `adapter.adapter_task`,
`policy.policy_task` / `dpo_task`, `ppo.ppo_task`). The pipeline calls it with the model config of
the loaded backbone, its input pipeline's batch spec and `StageInputs` (weights, data); this module
calls the SAME builder with the model config and batch spec derived from the config and no inputs
(abstract shapes only), so the TPU compiler sees the real step (as MaxText's train_compile):

* the batch spec the input pipeline produces with static shapes: L = round_up(max_prompt_len +
  max_response_len, data.bucket_multiple), Lp = round_up(max_prompt_len, data.bucket_multiple);
  PPO minibatches of rows T = round_up(data.max_prompt_len, 8) + ppo.max_new_tokens;
* the stage's engine config (`stage.stage_engine_config`: batch, optimizer, mesh, n_micro, trainable,
  and for PPO batch_size = minibatch and total_steps = iterations x steps per iteration, as `run_ppo`
  sets them).

Architecture: every transformer of the pipeline takes its architecture from its source (an HF
checkpoint, the SFT run, ...). Without weights it comes from the config's ``model`` section, which
must therefore describe the checkpoint (`experiments/preflight.py` compares the two on a machine
that has the files). Runtime settings (dtypes, remat, scanned layers, LoRA) follow the pipeline:
sft / policy use their own section's ``model``; the reward model and the adapter's frozen backbone
inherit their source's (`stage:sft` -> the sft section's; `hf:` / `llama2c:` -> float32, no remat,
as `load_source` loads them; `checkpoint:DIR` -> assumed to be the stage's own section's).

Model FLOPs per step (for MFU): 3 F per token of a fully trained model (PaLM convention), 2 F for a
LoRA-trained one (forward + activation gradients; no weight gradients of the frozen base; the
adapters' own FLOPs are negligible), F per token of a frozen forward (reference policy, adapter
backbone); F = `ModelConfig.flops_per_token(seq_len)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pro_jax import sharding
from pro_jax.configs import ConfigError
from pro_jax.models import ModelConfig
from pro_jax.models.sources import SOURCES
from pro_jax.stages.adapter import adapter_task
from pro_jax.stages.policy import DPO_TYPE, dpo_task, sft_task
from pro_jax.stages.ppo_loss import ppo_batch_spec, ppo_task
from pro_jax.stages.rm import rm_task
from pro_jax.stages.stage import stage_engine_config as section_engine_config
from pro_jax.train.config import model_config_from
from pro_jax.train.tasks import build_task
from pro_jax.train.trainer import Task

TRAIN_STAGES = ("sft", "rm", "adapter", "policy")
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers")
LOADED_RUNTIME = dict(dtype="float32", param_dtype="float32", remat="none", scan_layers=True)  # load_source


def is_pro_config(cfg: Any) -> bool:
  """A PRO pipeline config (`pro_config()` layout) rather than a plain engine config."""
  return all(k in cfg for k in ("objectives", "sft", "rm", "adapter", "policy"))


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // int(multiple)) * int(multiple)


# ---------------------------------------------------------------------------------------------
# Model configs as the pipeline would build them


def architecture(cfg: Any) -> ModelConfig:
  """The backbone architecture: the config's ``model`` section (no LoRA, no heads)."""
  section = cfg.model.to_dict()
  if not section.get("vocab_size"):
    raise ConfigError("model.vocab_size is 0: AOT needs the architecture in the config's model section "
                      "(the pipeline reads it from the checkpoint; set model.* to the checkpoint's values)")
  return model_config_from(section).replace(lora=None, head="lm", num_labels=1, value_head=False)


def _runtime(section: Any) -> dict:
  return {k: section.model[k] for k in RUNTIME_FIELDS}


def source_runtime(cfg: Any, source: str, own: Any, _seen: tuple = ()) -> dict:
  """Runtime (dtypes, remat, scan) of the model a stage loads from `source` (see module doc)."""
  kind, _, rest = str(source).partition(":")
  if kind == "stage":
    if rest in _seen or rest not in TRAIN_STAGES or rest == "adapter":
      raise ConfigError(f"source {source!r}: not a transformer stage (sft, rm, policy)")
    section = cfg[rest]
    if rest == "rm":  # the reward model inherits its own source's runtime
      return source_runtime(cfg, section.pro.source, section, _seen + (rest,))
    return _runtime(section)
  if kind in ("checkpoint", "scratch"):
    return _runtime(own)
  if kind in SOURCES:  # imported weights (hf:, llama2c:, kinds added with register_source) load in float32
    return dict(LOADED_RUNTIME)
  kinds = ", ".join(["'stage:NAME'"] + [entry.usage for entry in SOURCES.values()])
  raise ConfigError(f"model source {source!r}: expected one of {kinds}")


def stage_model_config(cfg: Any, stage: str) -> ModelConfig:
  """The transformer a stage trains (for the adapter: its frozen backbone), as the pipeline builds it."""
  arch = architecture(cfg)
  section = cfg[stage]
  lora = model_config_from(section.model).lora
  if stage in ("sft", "policy"):
    value_head = stage == "policy" and section.pro.loss == "ppo"
    if value_head and section.trainable != "lora":  # run_ppo attaches LoRA only under trainable="lora"
      lora = None
    return arch.replace(**_runtime(section), lora=lora, head="lm", value_head=value_head,
                        **(_soft_fields(cfg) if stage == "policy" else {}))
  if stage == "rm":
    K = len(tuple(section.pro.objectives) or tuple(cfg.objectives))
    return arch.replace(**source_runtime(cfg, section.pro.source, section), head="score", num_labels=K,
                        value_head=False, lora=lora if section.trainable == "lora" else None)
  if stage == "adapter":
    return arch.replace(**source_runtime(cfg, section.pro.backbone, section), head="none", value_head=False,
                        lora=None)
  raise ConfigError(f"stage {stage!r} has no train step; stages with one: {TRAIN_STAGES}")


SOFT_TOKEN_ID = 0  # the id of the soft-weight placeholder token (Llama's <unk>); it changes no shape


def _soft_fields(cfg: Any) -> dict:
  """ModelConfig fields of a RiC policy with soft weight tokens (`policy.pro.conditioning_mode="soft"`)."""
  pro = cfg.policy.pro
  if pro.loss != "ric" or pro.get("conditioning_mode", "text") != "soft":
    return {}
  return dict(weight_tokens=int(pro.soft_tokens), num_weights=len(cfg.objectives), weight_token_id=SOFT_TOKEN_ID)


def stage_engine_config(cfg: Any, stage: str) -> Any:
  """The stage's engine config, its model section showing the stage's transformer (see module doc)."""
  if stage not in TRAIN_STAGES:
    raise ConfigError(f"stage {stage!r} has no train step; stages with one: {TRAIN_STAGES}")
  c = section_engine_config(cfg[stage], cfg.seed, stage_model_config(cfg, stage))
  if stage == "policy" and c.pro.loss == "ppo":
    p = c.pro.ppo
    if p.rollout_batch % p.minibatch:
      raise ConfigError(f"policy.pro.ppo: rollout_batch={p.rollout_batch} is not a multiple of "
                        f"minibatch={p.minibatch}")
    c.batch_size = int(p.minibatch)
    c.total_steps = int(p.iterations * p.ppo_epochs * (p.rollout_batch // p.minibatch))
  return c


def _model_from(ecfg: Any, **changes) -> ModelConfig:
  """The stage's transformer from an engine config's model section (aot's loop-free variants edit it)."""
  return model_config_from(ecfg.model).replace(**changes)


# ---------------------------------------------------------------------------------------------
# Batch specs (the input pipeline's output with static shapes)


def _i32(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.int32)


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def batch_spec(kind: str, B: int, max_prompt_len: int, max_response_len: int, bucket_multiple: int, *,
               K: int = 0, responses: bool = False, extra: dict[str, tuple[int, ...]] | None = None) -> dict:
  """`Pipeline.batch_spec()` of a static-shape pipeline of `kind` ("pair" | "sequence" | "prompt")."""
  Lp = round_up(max_prompt_len, bucket_multiple)
  L = round_up(max_prompt_len + max_response_len, bucket_multiple)
  spec = {"prompt_tokens": _i32(B, Lp), "prompt_mask": _i32(B, Lp)}
  if kind == "pair":
    for side in ("chosen", "rejected"):
      for f in ("tokens", "mask", "loss_mask"):
        spec[f"{side}_{f}"] = _i32(B, L)
    spec["pair_objectives"] = _f32(B, K)
  elif kind == "sequence":
    for f in ("tokens", "mask", "loss_mask"):
      spec[f] = _i32(B, L)
    if responses:
      spec.update(scores=_f32(B, K), score_mask=_f32(B, K), response_index=_i32(B))
  elif kind != "prompt":
    raise ValueError(f"batch kind must be pair, sequence or prompt, got {kind!r}")
  spec["example_id"] = _i32(B)
  for name, shape in (extra or {}).items():
    spec[name] = _f32(B, *shape)
  return spec


# ---------------------------------------------------------------------------------------------
# Tasks: the stages' own builders, with abstract shapes


def sft_stage_task(cfg: Any, ecfg: Any) -> Task:
  """Stage sft: next-token loss on sequence batches (responses "responses" adds the score fields)."""
  d = cfg.data
  spec = batch_spec("sequence", ecfg.batch_size, d.max_prompt_len, d.max_response_len, d.bucket_multiple,
                    K=len(cfg.objectives), responses=ecfg.pro.responses == "responses")
  return sft_task(ecfg, _model_from(ecfg, head="lm", value_head=False), spec, name="sft")


def rm_stage_task(cfg: Any, ecfg: Any) -> Task:
  """Stage rm: K score heads, Bradley-Terry per objective on pair batches (`rm.rm_task`)."""
  d = cfg.data
  objectives = list(ecfg.pro.objectives) or list(cfg.objectives)
  lora = model_config_from(ecfg.model).lora if ecfg.trainable == "lora" else None
  mcfg = _model_from(ecfg, head="score", num_labels=len(objectives), value_head=False, lora=lora)
  spec = batch_spec("pair", ecfg.batch_size, d.max_prompt_len, d.max_response_len, d.bucket_multiple,
                    K=len(objectives))
  return rm_task(ecfg, mcfg, spec, objectives)


def adapter_stage_task(cfg: Any, ecfg: Any) -> Task:
  """Stage adapter: the MLP over mean-pooled prompt features of the frozen backbone (`adapter.adapter_task`)."""
  d = cfg.data
  K = len(cfg.objectives)
  spec = batch_spec("prompt", ecfg.batch_size, d.max_prompt_len, 1, d.bucket_multiple, extra={"target_weights": (K,)})
  return adapter_task(ecfg, _model_from(ecfg, head="none", value_head=False, lora=None), spec, K,
                      hidden=ecfg.pro.hidden, layers=ecfg.pro.layers)


def policy_stage_task(cfg: Any, ecfg: Any) -> Task:
  """Stage policy: loss `policy.pro.loss` (sft / ric sequences, dpo / wdpo / modpo pairs, ppo minibatches)."""
  d, pro = cfg.data, ecfg.pro
  kind = pro.loss
  K = len(cfg.objectives)
  if kind == "ppo":
    return ppo_stage_task(cfg, ecfg)
  mcfg = _model_from(ecfg, head="lm", value_head=False)
  if kind in ("sft", "ric"):
    prompt_len = pro.max_prompt_len if kind == "ric" else d.max_prompt_len
    soft = _soft_fields(cfg)  # the weights enter as learned token embeddings: the batch carries w
    spec = batch_spec("sequence", ecfg.batch_size, prompt_len, d.max_response_len, d.bucket_multiple,
                      extra={"weights": (K,)} if soft else None)
    return sft_task(ecfg, mcfg.replace(**soft), spec, name=f"policy/{kind}")
  if kind not in DPO_TYPE:
    raise ConfigError(f"policy.pro.loss must be one of sft, ric, dpo, wdpo, modpo, ppo; got {kind!r}")
  extra = {"weights": (K,), "reward_chosen": (K,), "reward_rejected": (K,)}
  same_as_init = pro.reference == pro.init
  ref_key = "base" if ecfg.trainable == "lora" and same_as_init else "ref"  # LoRA: the base is the reference
  ref_dtype = source_runtime(cfg, pro.init if same_as_init else pro.reference, ecfg)["param_dtype"]
  if pro.precompute_reference:
    ref_key = "batch"
    extra.update(ref_chosen_logp=(), ref_rejected_logp=())
  spec = batch_spec("pair", ecfg.batch_size, d.max_prompt_len, d.max_response_len, d.bucket_multiple, K=K,
                    extra=extra)
  return dpo_task(ecfg, mcfg, spec, kind, beta=pro.beta, ref_key=ref_key, ref_dtype=ref_dtype,
                  response_window=d.max_response_len, name=f"policy/{kind}")


def ppo_stage_task(cfg: Any, ecfg: Any) -> Task:
  """The PPO minibatch update (`ppo.ppo_task`): policy + value head, PPO variables layout."""
  p = ecfg.pro.ppo
  lora = model_config_from(ecfg.model).lora if ecfg.trainable == "lora" else None
  mcfg = _model_from(ecfg, head="lm", value_head=True, lora=lora)
  spec = ppo_batch_spec(ecfg.batch_size, round_up(cfg.data.max_prompt_len, 8), p.max_new_tokens)  # as prompt_arrays
  return ppo_task(ecfg, mcfg, spec, clip_eps=p.clip_eps, vf_coef=p.vf_coef, vf_clip=p.vf_clip,
                  entropy_coef=p.entropy_coef, temperature=p.temperature, name="policy/ppo")


STAGE_TASKS: dict[str, Callable[[Any, Any], Task]] = {"sft": sft_stage_task, "rm": rm_stage_task,
                                                      "adapter": adapter_stage_task, "policy": policy_stage_task}


def stage_task(cfg: Any, stage: str, ecfg: Any | None = None) -> Task:
  """The abstract Task of `stage` (`ecfg`: its engine config, default `stage_engine_config(cfg, stage)`)."""
  if stage not in STAGE_TASKS:
    raise ConfigError(f"stage {stage!r} has no train step; stages with one: {TRAIN_STAGES}")
  return STAGE_TASKS[stage](cfg, ecfg if ecfg is not None else stage_engine_config(cfg, stage))


# ---------------------------------------------------------------------------------------------
# `pro-jax aot`


@dataclasses.dataclass
class AotTarget:
  engine_config: Any
  task_fn: Callable[[Any], Task]
  description: str


def describe(cfg: Any, stage: str) -> str:
  """One line: stage, loss, model, trainable, batch."""
  ecfg = stage_engine_config(cfg, stage)
  m = stage_model_config(cfg, stage)
  what = stage + (f" (loss {ecfg.pro.loss})" if stage == "policy" else "")
  train = ecfg.trainable if stage != "adapter" else "adapter MLP, frozen backbone"
  if ecfg.trainable == "lora" and m.lora is not None and stage != "adapter":
    train = f"LoRA r={m.lora.rank} on {','.join(m.lora.targets)}"
  batch = f"{ecfg.batch_size} {'rollout rows' if stage == 'policy' and ecfg.pro.loss == 'ppo' else 'examples'}"
  return (f"PRO stage {what}: {m.num_params():,} params ({m.n_layers} layers, d={m.d_model}), {train}, "
          f"batch {batch}, {m.dtype} compute / {m.param_dtype} params, remat {m.remat}")


@dataclasses.dataclass
class DecodeTarget:
  """What `pro-jax aot --decode` compiles: the policy's decode step for its rollouts."""

  model: ModelConfig  # the generator (the policy without its value head), the stage's dtypes
  mesh: Any
  rules: Any
  batch: int  # rows per decode step
  cache_len: int  # prompt + new tokens


def decode_target(cfg: Any, batch: int = 0, cache_len: int = 0) -> DecodeTarget:
  """The policy stage's rollout decode step: PPO rows (`ppo.rollout_batch`, prompts padded as
  `prompt_arrays` pads them + `ppo.max_new_tokens`), else `eval.batch_size` rows of `data.max_prompt_len`
  + `eval.max_new_tokens`; `batch` / `cache_len` override (> 0)."""
  if not is_pro_config(cfg):
    raise ConfigError("--decode compiles a PRO pipeline config's policy decode step; this is not one")
  ecfg = stage_engine_config(cfg, "policy")
  if ecfg.pro.loss == "ppo":
    p = ecfg.pro.ppo
    b, n = int(p.rollout_batch), round_up(cfg.data.max_prompt_len, 8) + int(p.max_new_tokens)
  else:
    b, n = int(cfg.eval.batch_size), int(cfg.data.max_prompt_len) + int(cfg.eval.max_new_tokens)
  model = stage_model_config(cfg, "policy").replace(value_head=False)
  return DecodeTarget(model, ecfg.mesh, sharding.rules_from_config(ecfg.sharding.rules), batch or b,
                      cache_len or n)


def aot_target(cfg: Any, stage: str | None = None) -> AotTarget:
  """What `pro-jax aot` compiles: the engine config and `task_fn(engine_cfg) -> Task`.

  A PRO pipeline config compiles `stage` (default: the config's ``stage`` field, else "policy"); any
  other config is an engine config compiled with `pro_jax.train.tasks.build_task`.
  """
  if not is_pro_config(cfg):
    if stage:
      raise ConfigError(f"--stage {stage}: the config is not a PRO pipeline config (no sft/rm/adapter/policy sections)")
    return AotTarget(cfg, build_task, "")
  stage = stage or (cfg.stage if "stage" in cfg and cfg.stage else "policy")
  ecfg = stage_engine_config(cfg, stage)
  return AotTarget(ecfg, lambda e: stage_task(cfg, stage, e), describe(cfg, stage))


__all__ = ["aot_target", "decode_target", "DecodeTarget", "stage_task", "stage_engine_config", "stage_model_config", "batch_spec", "ppo_batch_spec",
           "architecture", "source_runtime", "is_pro_config", "describe", "AotTarget", "TRAIN_STAGES"]
