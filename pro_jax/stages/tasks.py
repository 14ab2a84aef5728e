"""The engine `Task` of a PRO stage from its config ALONE, for `pro-jax aot` (no weights, data, tokenizer).

    engine_cfg, task_fn, what = aot_target(cfg, "policy")   # cfg: a `pro_config()`-style config
    report = pro_jax.train.aot.aot_compile(engine_cfg, "v5e:4x4", task_fn)

The pipeline (`pro_jax.stages.pipeline`) builds each stage's Task from loaded weights, tokenized data and
scores; here the same Task is built from abstract shapes, so the TPU compiler sees the real step:

* the same loss plug-in (`policy.policy_loss`, `reward_model.rm_loss`, `adapter.adapter_loss`,
  `ppo_trainer.ppo_loss`) around the same `Transformer`s, the same trained-variables layout
  (`reward_model._to_training_layout`, `ppo_trainer.to_ppo_layout`), the same frozen inputs;
* the batch spec the input pipeline produces with static shapes: L = round_up(max_prompt_len +
  max_response_len, data.bucket_multiple), Lp = round_up(max_prompt_len, data.bucket_multiple);
  PPO minibatches of rows T = round_up(data.max_prompt_len, 8) + ppo.max_new_tokens;
* the stage's engine config (batch, optimizer, mesh, n_micro, trainable, and for PPO batch_size =
  minibatch and total_steps = iterations x steps per iteration, as `run_ppo` sets them).

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

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pro_jax.configs import ConfigError
from pro_jax.models import ModelConfig, Transformer, abstract_variables, logical_axes
from pro_jax.train.config import model_config_from
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
  if kind in ("hf", "llama2c"):
    return dict(LOADED_RUNTIME)
  if kind in ("checkpoint", "scratch"):
    return _runtime(own)
  raise ConfigError(f"model source {source!r}: expected scratch, stage:NAME, checkpoint:DIR, hf:DIR or llama2c:FILE")


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
  mcfg = stage_model_config(cfg, stage)
  c = copy.deepcopy(cfg[stage])
  c.seed = int(cfg.seed)
  for k, v in mcfg.to_dict().items():
    if k in c.model and k not in ("lora", "rope_scaling"):
      c.model[k] = v
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


def ppo_batch_spec(minibatch: int, max_prompt_len: int, max_new_tokens: int) -> dict:
  """The PPO minibatch (`ppo_trainer.ppo_loss`): rollout rows [M, T] and per-response-token fields [M, N]."""
  M, N = int(minibatch), int(max_new_tokens)
  T = round_up(max_prompt_len, 8) + N
  spec = {"sequences": _i32(M, T), "sequence_mask": _i32(M, T), "response_mask": _i32(M, N)}
  spec.update({k: _f32(M, N) for k in ("old_logp", "old_values", "advantages", "returns")})
  return spec


# ---------------------------------------------------------------------------------------------
# Tasks


def _trained_passes(mcfg: ModelConfig, trainable: str) -> float:
  return 2.0 if trainable == "lora" and mcfg.lora is not None else 3.0


def _task(loss_fn: Callable, abstract: Any, axes: Any, spec: dict, *, name: str, mcfg: ModelConfig | None,
          tokens_per_step: int, flops: float | None, frozen_abstract: dict | None = None,
          frozen_axes: dict | None = None) -> Task:
  def no_init(*args, **kwargs):
    raise RuntimeError(f"the AOT task of stage {name!r} has abstract shapes only; train with the pipeline")

  return Task(loss_fn=loss_fn, abstract_variables=abstract, logical_axes=axes, init_variables=no_init,
              batch_spec=spec, frozen_abstract=frozen_abstract or {}, frozen_logical_axes=frozen_axes or {},
              model_config=mcfg, tokens_per_step=tokens_per_step, flops_per_step=flops, name=name)


def _params_only(model: Transformer, dtype: str) -> tuple[dict, dict]:
  """Abstract {"params": ...} of a frozen model loaded in `dtype`, and its logical axes."""
  abstract = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                                     abstract_variables(model)["params"])}
  return abstract, {"params": logical_axes(model)["params"]}


def sft_task(cfg: Any, ecfg: Any) -> Task:
  """Stage sft: next-token loss on sequence batches (responses "responses" adds the score fields)."""
  from pro_jax.stages.policy import policy_loss
  d = cfg.data
  mcfg = _model_from(ecfg, head="lm", value_head=False)
  model = Transformer(mcfg)
  spec = batch_spec("sequence", ecfg.batch_size, d.max_prompt_len, d.max_response_len, d.bucket_multiple,
                    K=len(cfg.objectives), responses=ecfg.pro.responses == "responses")
  B, L = spec["tokens"].shape
  flops = _trained_passes(mcfg, ecfg.trainable) * mcfg.flops_per_token(L) * B * L
  return _task(policy_loss("sft", model), abstract_variables(model), logical_axes(model), spec, name="sft",
               mcfg=mcfg, tokens_per_step=B * L, flops=flops)


def rm_task(cfg: Any, ecfg: Any) -> Task:
  """Stage rm: K score heads, Bradley-Terry per objective on pair batches (`reward_model.rm_loss`)."""
  from pro_jax.stages.rm import _to_training_layout, rm_loss
  d = cfg.data
  objectives = list(ecfg.pro.objectives) or list(cfg.objectives)
  lora = model_config_from(ecfg.model).lora if ecfg.trainable == "lora" else None
  mcfg = _model_from(ecfg, head="score", num_labels=len(objectives), value_head=False, lora=lora)
  model = Transformer(mcfg)
  spec = batch_spec("pair", ecfg.batch_size, d.max_prompt_len, d.max_response_len, d.bucket_multiple,
                    K=len(objectives))
  B, L = spec["chosen_tokens"].shape
  flops = _trained_passes(mcfg, ecfg.trainable) * mcfg.flops_per_token(L) * 2 * B * L
  return _task(rm_loss(model, objectives), _to_training_layout(abstract_variables(model)),
               _to_training_layout(logical_axes(model)), spec, name="reward_model", mcfg=mcfg,
               tokens_per_step=2 * B * L, flops=flops)


def adapter_task(cfg: Any, ecfg: Any) -> Task:
  """Stage adapter: the MLP over mean-pooled prompt features of the frozen backbone (`adapter_loss`)."""
  from pro_jax.stages.adapter import AdapterMLP, adapter_loss, adapter_variables
  d = cfg.data
  K = len(cfg.objectives)
  bcfg = _model_from(ecfg, head="none", value_head=False, lora=None)
  backbone = Transformer(bcfg)
  adapter = AdapterMLP(K, hidden=ecfg.pro.hidden, layers=ecfg.pro.layers)
  abstract = jax.eval_shape(lambda: adapter_variables(adapter, bcfg.d_model, jax.random.PRNGKey(0)))
  axes = jax.tree.map(lambda x: P(*([None] * len(x.shape))), abstract)  # adapter_axes: all replicated
  spec = batch_spec("prompt", ecfg.batch_size, d.max_prompt_len, 1, d.bucket_multiple,
                    extra={"target_weights": (K,)})
  B, Lp = spec["prompt_tokens"].shape
  frozen, frozen_axes = _params_only(backbone, bcfg.param_dtype)
  return _task(adapter_loss(adapter, backbone), abstract, axes, spec, name="adapter", mcfg=None,
               tokens_per_step=B * Lp, flops=bcfg.flops_per_token(Lp) * B * Lp,
               frozen_abstract={"backbone": frozen}, frozen_axes={"backbone": frozen_axes})


def policy_task(cfg: Any, ecfg: Any) -> Task:
  """Stage policy: loss `policy.pro.loss` (sft / ric sequences, dpo / wdpo / modpo pairs, ppo minibatches)."""
  from pro_jax.stages.policy import DPO_TYPE, policy_loss
  d, pro = cfg.data, ecfg.pro
  kind = pro.loss
  K = len(cfg.objectives)
  if kind == "ppo":
    return ppo_task(cfg, ecfg)
  mcfg = _model_from(ecfg, head="lm", value_head=False)
  model = Transformer(mcfg)
  passes = _trained_passes(mcfg, ecfg.trainable)
  if kind in ("sft", "ric"):
    prompt_len = pro.max_prompt_len if kind == "ric" else d.max_prompt_len
    soft = _soft_fields(cfg)
    if soft:  # the weights enter as learned token embeddings: the model has them, the batch carries w
      mcfg = mcfg.replace(**soft)
      model = Transformer(mcfg)
    spec = batch_spec("sequence", ecfg.batch_size, prompt_len, d.max_response_len, d.bucket_multiple,
                      extra={"weights": (K,)} if soft else None)
    B, L = spec["tokens"].shape
    return _task(policy_loss("sft", model), abstract_variables(model), logical_axes(model), spec,
                 name=f"policy/{kind}", mcfg=mcfg, tokens_per_step=B * L,
                 flops=passes * mcfg.flops_per_token(L) * B * L)
  if kind not in DPO_TYPE:
    raise ConfigError(f"policy.pro.loss must be one of sft, ric, dpo, wdpo, modpo, ppo; got {kind!r}")
  extra = {"weights": (K,), "reward_chosen": (K,), "reward_rejected": (K,)}
  frozen, frozen_axes = None, None
  same_as_init = pro.reference == pro.init
  if ecfg.trainable == "lora" and same_as_init:
    ref_key = "base"  # the LoRA policy's own base weights are the reference
  else:
    ref_key = "ref"
    ref_runtime = source_runtime(cfg, pro.reference, ecfg) if not same_as_init else \
        source_runtime(cfg, pro.init, ecfg)
    ref_model = Transformer(mcfg.replace(lora=None))
    fa, fx = _params_only(ref_model, ref_runtime["param_dtype"])
    frozen, frozen_axes = {"ref": fa}, {"ref": fx}
  if pro.precompute_reference:
    ref_key, frozen, frozen_axes = "batch", None, None
    extra.update(ref_chosen_logp=(), ref_rejected_logp=())
  spec = batch_spec("pair", ecfg.batch_size, d.max_prompt_len, d.max_response_len, d.bucket_multiple, K=K,
                    extra=extra)
  B, L = spec["chosen_tokens"].shape
  fwd = mcfg.flops_per_token(L)
  flops = passes * fwd * 2 * B * L + (0.0 if ref_key == "batch" else fwd * 2 * B * L)
  loss = policy_loss(kind, model, beta=pro.beta, ref_key=ref_key, response_window=d.max_response_len)
  return _task(loss, abstract_variables(model),
               logical_axes(model), spec, name=f"policy/{kind}", mcfg=mcfg, tokens_per_step=2 * B * L,
               flops=flops, frozen_abstract=frozen, frozen_axes=frozen_axes)


def ppo_task(cfg: Any, ecfg: Any) -> Task:
  """The PPO minibatch update (`ppo_trainer.ppo_loss`): policy + value head, PPO variables layout."""
  from pro_jax.stages.ppo import ppo_loss, to_ppo_layout
  p = ecfg.pro.ppo
  lora = model_config_from(ecfg.model).lora if ecfg.trainable == "lora" else None
  mcfg = _model_from(ecfg, head="lm", value_head=True, lora=lora)
  model = Transformer(mcfg)
  spec = ppo_batch_spec(ecfg.batch_size, cfg.data.max_prompt_len, p.max_new_tokens)
  M, T = spec["sequences"].shape
  loss = ppo_loss(model, p.clip_eps, p.vf_coef, p.vf_clip, p.entropy_coef, temperature=p.temperature)
  return _task(loss, to_ppo_layout(abstract_variables(model), ecfg.trainable),
               to_ppo_layout(logical_axes(model), ecfg.trainable), spec, name="policy/ppo", mcfg=mcfg,
               tokens_per_step=M * T, flops=_trained_passes(mcfg, ecfg.trainable) * mcfg.flops_per_token(T) * M * T)


STAGE_TASKS: dict[str, Callable[[Any, Any], Task]] = {"sft": sft_task, "rm": rm_task, "adapter": adapter_task,
                                                      "policy": policy_task}


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


def aot_target(cfg: Any, stage: str | None = None) -> AotTarget:
  """What `pro-jax aot` compiles: the engine config and `task_fn(engine_cfg) -> Task`.

  A PRO pipeline config compiles `stage` (default: the config's ``stage`` field, else "policy"); any
  other config is an engine config compiled with `pro_jax.train.tasks.build_task`.
  """
  if not is_pro_config(cfg):
    if stage:
      raise ConfigError(f"--stage {stage}: the config is not a PRO pipeline config (no sft/rm/adapter/policy sections)")
    from pro_jax.train.tasks import build_task
    return AotTarget(cfg, build_task, "")
  stage = stage or (cfg.stage if "stage" in cfg and cfg.stage else "policy")
  ecfg = stage_engine_config(cfg, stage)
  return AotTarget(ecfg, lambda e: stage_task(cfg, stage, e), describe(cfg, stage))


__all__ = ["aot_target", "stage_task", "stage_engine_config", "stage_model_config", "batch_spec", "ppo_batch_spec",
           "architecture", "source_runtime", "is_pro_config", "describe", "AotTarget", "TRAIN_STAGES"]
