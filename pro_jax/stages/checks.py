"""Everything a PRO stage command checks before it writes anything (`check_stages`).

`pro-jax sft / rm / adapter / policy / eval / demo` read the data and the tokenizer first
(`load_context`: a bad row is a `DataError` naming its file, row and field), then run these checks
for every stage they are about to run, and only then create the workdir and W/tokenizer
(`Context.write_workdir`). A bad config is one `ConfigError` listing every problem, each under its
config key (`policy.optim.lr`, not the engine's `optim.lr`), exit code 2, nothing written.

Checked per stage: its engine config (`pro_jax.train.config.config_errors`, the same checks `pro-jax
train` runs first; PPO's with the batch size and step count it derives), the pipeline's `model`
section, the model sources (`stage:NAME` needs W/NAME's checkpoints unless NAME runs earlier in the
same command; files and local directories must exist; a Hub id is resolved when it is loaded), the
scorers, the policy's loss / weights source / conditioning, PPO's settings, and the runs `eval`
compares. In strict data mode (`data.mode="strict"`) also the lengths: every train and held-out row of
the stages that tokenize responses (sft, rm, policy) is tokenized once as those stages will, so an
over-long row is a `DataError` naming it before anything is written (lenient mode drops such rows).
"""

from __future__ import annotations

import copy
from typing import Any

from pro_jax.configs import ConfigError
from pro_jax.data import files
from pro_jax.data.pipeline import Pipeline, PipelineConfig
from pro_jax.models.hub import is_hub_id
from pro_jax.models.sources import parse_source
from pro_jax.pro.weights import parse_weights_source
from pro_jax.stages.context import Context
from pro_jax.stages.policy import DPO_TYPE
from pro_jax.stages.ppo_loss import PPOConfig
from pro_jax.stages.stage import stage_engine_config
from pro_jax.train.config import config_errors, dtype_errors, model_config_from

LOSSES = ("sft", "ric") + tuple(DPO_TYPE) + ("ppo",)
TRAINED = ("sft", "rm", "adapter", "policy")  # the stages that are engine runs with their own config section


def ppo_config(cfg: Any) -> PPOConfig:
  """The `PPOConfig` of `policy.pro.ppo` (with the data's prompt length and template)."""
  pp = cfg.policy.pro.ppo
  return PPOConfig(iterations=pp.iterations, rollout_batch=pp.rollout_batch, minibatch=pp.minibatch,
                   ppo_epochs=pp.ppo_epochs, max_prompt_len=cfg.data.max_prompt_len,
                   max_new_tokens=pp.max_new_tokens, temperature=pp.temperature, top_k=pp.top_k, top_p=pp.top_p,
                   kl_coef=pp.kl_coef, adaptive_kl=pp.adaptive_kl, kl_target=pp.kl_target, kl_horizon=pp.kl_horizon,
                   gamma=pp.gamma, lam=pp.lam, whiten_advantages=pp.whiten_advantages, clip_eps=pp.clip_eps,
                   vf_coef=pp.vf_coef, vf_clip=pp.vf_clip, entropy_coef=pp.entropy_coef,
                   reward_clip=pp.reward_clip if pp.reward_clip > 0 else None, template=cfg.data.template)


def _engine_errors(cfg: Any, stage: str) -> list[str]:
  """The engine's config checks on the stage's section, each message under the section's key."""
  section = cfg[stage]
  ecfg = stage_engine_config(section, cfg.seed, None)
  if stage == "policy" and section.pro.loss == "ppo":  # run_ppo derives these (pro_jax.stages.ppo)
    try:
      ppo = ppo_config(cfg)
      ppo.check()
      ecfg = copy.deepcopy(ecfg)
      ecfg.batch_size = ppo.minibatch
      ecfg.total_steps = ppo.iterations * ppo.steps_per_iteration
    except (ValueError, TypeError) as e:
      return [f"policy.pro.ppo: {e}"]
  out = []
  for e in config_errors(ecfg):
    out.append(f"{stage}.{e}" if e.split(" ")[0].split("=")[0].split(":")[0] in _keys(ecfg) else f"{stage}: {e}")
  return out


def _keys(cfg: Any, prefix: str = "") -> set[str]:
  """Every dotted key of a config dict (so "optim.lr" gets the stage's prefix: "rm.optim.lr")."""
  out = set()
  for k, v in cfg.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= _keys(v, prefix + k + ".")
  return out


def _source_errors(ctx: Context, key: str, spec: str, before: set[str]) -> list[str]:
  """Problems with the model source `spec` of config key `key` (stages in `before` run first)."""
  if spec.startswith("stage:"):
    name = spec.partition(":")[2]
    if name in before or files.as_path(ctx.path(name, "checkpoints")).is_dir():
      return []
    return [f"{key}={spec!r}: {ctx.path(name)} holds no checkpoint: run `pro-jax {name}` with this workdir first"]
  try:
    kind, path = parse_source(spec)
  except ValueError as e:
    return [f"{key}: {e}"]
  if not path or (kind == "hf" and is_hub_id(path) and not files.as_path(path).exists()):
    return []  # scratch; a Hub id is resolved (cache / download) when it is loaded
  if not files.as_path(path).exists():
    return [f"{key}={spec!r}: {path} does not exist"]
  return []


def _scorer_errors(ctx: Context, before: set[str]) -> list[str]:
  errors = []
  for spec in ctx.cfg.scorers:
    if spec == "synthetic":
      continue
    if spec == "rm":
      if "rm" not in before and not files.as_path(ctx.path("rm", "checkpoints")).is_dir():
        errors.append(f"scorers: 'rm' scores with {ctx.path('rm')}, which holds no checkpoint: run `pro-jax rm` "
                      "with this workdir first")
    elif spec.startswith("hf:"):
      path, _, name = spec[3:].rpartition("=")
      if not path or not name:
        errors.append(f"scorers: {spec!r}: expected hf:DIR=OBJECTIVE")
      elif not files.as_path(path).exists() and not is_hub_id(path):  # a Hub id is fetched when loaded
        errors.append(f"scorers: {spec!r}: {path} does not exist")
    else:
      errors.append(f"scorers: unknown scorer {spec!r} (synthetic, rm, hf:DIR=OBJECTIVE)")
  return errors


def _policy_errors(ctx: Context, before: set[str]) -> list[str]:
  pro = ctx.cfg.policy.pro
  errors = []
  if pro.loss not in LOSSES:
    errors.append(f"policy.pro.loss must be one of {', '.join(LOSSES)}; got {pro.loss!r}")
  try:
    ws = parse_weights_source(pro.weights_source, ctx.K)
    uses_weights = pro.loss != "ric" and pro.loss != "sft"
    if uses_weights and ws.kind == "adapter" and "adapter" not in before and \
        not files.as_path(ctx.path("adapter")).is_dir():
      errors.append(f"policy.pro.weights_source='adapter' needs the preference adapter {ctx.path('adapter')}: run "
                    "`pro-jax adapter` with this workdir first")
  except ValueError as e:
    errors.append(f"policy.pro.weights_source: {e}")
  if pro.loss == "ric":
    if pro.conditioning not in ("own", "best_of", "rewards"):
      errors.append(f"policy.pro.conditioning must be 'own', 'best_of' or 'rewards', got {pro.conditioning!r}")
    if pro.conditioning_mode not in ("text", "soft"):
      errors.append(f"policy.pro.conditioning_mode must be 'text' or 'soft', got {pro.conditioning_mode!r}")
  errors += _source_errors(ctx, "policy.pro.init", pro.init, before)
  if pro.loss in DPO_TYPE + ("ppo",):
    errors += _source_errors(ctx, "policy.pro.reference", pro.reference, before)
  return errors


def _eval_errors(ctx: Context, before: set[str]) -> list[str]:
  runs = list(ctx.cfg.eval.policies) or [ctx.cfg.policy.pro.name]
  made = {ctx.cfg.policy.pro.name} if "policy" in before else set()
  return [f"eval.policies: {ctx.path(r)} holds no checkpoint: train it first (`pro-jax policy` with "
          f"--config.policy.pro.name={r})" for r in runs
          if r not in made and not files.as_path(ctx.path(r, "checkpoints")).is_dir()]


def stage_errors(ctx: Context, stage: str, before: set[str] = frozenset()) -> list[str]:
  """Every problem that would stop `stage` (stages in `before` run earlier in the same command)."""
  cfg, before = ctx.cfg, set(before)
  errors = _engine_errors(cfg, stage) if stage in TRAINED else []
  if stage == "sft":
    errors += _source_errors(ctx, "sft.pro.source", cfg.sft.pro.source, before)
    if cfg.sft.pro.responses not in ("chosen", "responses"):
      errors.append(f"sft.pro.responses must be 'chosen' or 'responses', got {cfg.sft.pro.responses!r}")
  elif stage == "rm":
    errors += _source_errors(ctx, "rm.pro.source", cfg.rm.pro.source, before)
  elif stage == "adapter":
    errors += _source_errors(ctx, "adapter.pro.backbone", cfg.adapter.pro.backbone, before)
    errors += _scorer_errors(ctx, before)
  elif stage == "policy":
    errors += _policy_errors(ctx, before)
    if cfg.policy.pro.loss != "sft":
      errors += _scorer_errors(ctx, before)
  elif stage == "eval":
    errors += _eval_errors(ctx, before)
    errors += _scorer_errors(ctx, before)
  return errors


def check_stages(ctx: Context, stages: tuple[str, ...] | list[str]) -> None:
  """ConfigError listing every problem of running `stages` in order (nothing is written)."""
  errors = [e for e in dtype_errors("model.dtype", ctx.cfg.model.dtype) + dtype_errors("model.param_dtype",
                                                                                       ctx.cfg.model.param_dtype)]
  section = ctx.cfg.model.to_dict()
  section["vocab_size"] = section.get("vocab_size") or len(ctx.tokenizer)  # 0 = the tokenizer's (stage_model_config)
  try:
    model_config_from(section)
  except ConfigError as e:
    errors.append(str(e))
  for i, stage in enumerate(stages):
    errors += [e for e in stage_errors(ctx, stage, set(stages[:i])) if e not in errors]
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  check_lengths(ctx, stages)


def check_lengths(ctx: Context, stages: tuple[str, ...] | list[str]) -> None:
  """Strict data mode: tokenize the rows the stages will (train and held-out; pairs, and the SFT
  responses) and raise the pipeline's `DataError` (file "train" / "eval", row, field) for an over-long
  one, before the workdir exists. Lenient mode: nothing to check (the stages drop those rows)."""
  d = ctx.cfg.data
  if d.mode != "strict" or not set(stages) & {"sft", "rm", "policy"}:
    return
  kinds = [("pair", "chosen")]
  if "sft" in stages and ctx.cfg.sft.pro.responses == "responses":
    kinds.append(("sequence", "responses"))
  for name, rows in (("train", ctx.train), ("eval", ctx.eval)):
    for kind, seq in kinds:
      subset = ([ex for ex in rows if ex.get("chosen") and ex.get("rejected")] if kind == "pair"
                else [ex for ex in rows if len(ex.get("responses", []))])
      if not subset:
        continue
      pc = PipelineConfig(kind=kind, batch_size=1, max_prompt_len=d.max_prompt_len,
                          max_response_len=d.max_response_len, bucket_multiple=d.bucket_multiple,
                          template=d.template, sequence_responses=seq, strict=True, shuffle=False)
      Pipeline(subset, ctx.tokenizer, pc, name=name, process_index=0, process_count=1)


__all__ = ["check_lengths", "check_stages", "stage_errors", "ppo_config"]
