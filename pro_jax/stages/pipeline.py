"""The PRO pipeline: one config, five stages, one workdir.

    pro-jax sft     --config CONFIG --workdir W   # reference policy (optional: or bring one)
    pro-jax rm      --config CONFIG --workdir W   # multi-head reward model (when scorers use "rm")
    pro-jax adapter --config CONFIG --workdir W   # targets w* and the preference adapter
    pro-jax policy  --config CONFIG --workdir W   # the policy with prompt-aware weights
    pro-jax eval    --config CONFIG --workdir W   # PRO vs every fixed weight vector
    pro-jax demo    [--config demo] --workdir W   # all of the above

Each stage is an engine run in ``W/<stage>`` (resumable, checkpointed) and reads what earlier stages
left in ``W``: the tokenizer, the scorers' cache ``W/scores.sqlite``, the normalization statistics
``W/norm.json``, ``W/sft``, ``W/rm``, ``W/adapter``, ``W/policy``; the evaluation writes ``W/report``.
Nothing is written before the data, the tokenizer and every stage to run were checked
(`load_context` reads, `pro_jax.stages.checks.check_stages` checks, `Context.write_workdir` writes).

Config sections (see `pro_jax/configs/demo.py` for a complete example):

* ``objectives``: the K objective names (the order of every weight vector).
* ``data``: ``sources`` ("synthetic" = the embedded task; else "BUILDER/CONFIG:SPLIT" read with
  `pro_jax.data.sources.load_examples` from ``manual_dir`` or prepared ``data_dir``), optional
  ``eval_sources`` (else ``eval_fraction`` of the rows is held out), ``max_train`` / ``max_eval`` (seeded
  samples of that many rows; 0 = all), lengths, template, validation mode (``mode``: lenient drops
  over-long rows in every stage, strict raises).
* ``task``: the embedded task's sizes (used by the "synthetic" source and scorer).
* ``tokenizer``: "" = the embedded task's own tokenizer; a directory, a SentencePiece ``.model`` or a
  ``.gguf`` file (its own tokenizer and chat template).
* ``model``: the architecture for ``scratch`` sources.
* ``scorers``: how the K objectives are scored: "synthetic" (programmatic), "rm" (the rm stage's
  heads), "hf:DIR=NAME" (an imported HF sequence classifier as objective NAME).
* ``norm``: normalization method. ``sft`` / ``rm`` / ``adapter`` / ``policy``: engine configs of the
  stages, each with a ``pro`` section; ``eval``: the comparison.

Model sources in ``pro`` sections: "scratch", "stage:sft" (W/sft), "checkpoint:DIR", "hf:DIR",
"llama2c:FILE", "gguf:FILE".
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pro_jax.data.pipeline import Pipeline, PipelineConfig
from pro_jax.models import ModelConfig, Transformer
from pro_jax.models.sources import Backbone, load_source
from pro_jax.pro.weights import target_weights
from pro_jax.stages import evaluate
from pro_jax.stages.adapter import evaluate_adapter, train_adapter
from pro_jax.stages.checks import check_stages, ppo_config
from pro_jax.stages.context import (Context, example_weights, load_context, remap_objectives, responses_of, say,
                                    soft_conditioning, targets_for, true_weights, write_json)
from pro_jax.stages.policy import (DPO_TYPE, best_of_examples, dpo_task, precompute_reference_logps, ric_examples,
                                   reward_conditioned_examples, sft_task)
from pro_jax.stages.ppo import run_ppo
from pro_jax.stages.rm import pair_accuracy, train_reward_model
from pro_jax.stages.stage import StageInputs, stage_engine_config
from pro_jax.train.config import model_config_from
from pro_jax.train.trainer import raise_if_preempted, train

log = logging.getLogger("pro_jax")
STAGES = ("sft", "rm", "adapter", "policy", "eval")


def _train(cfg: Any, workdir: str, task: Any, existing: str) -> Any:
  result = train(cfg, workdir, task, existing=existing)
  raise_if_preempted(result, workdir)
  return result


# ---------------------------------------------------------------------------------------------
# Stage plumbing


def stage_model_config(ctx: Context, stage_cfg: Any, backbone: Backbone, **heads) -> ModelConfig:
  """The stage model: the backbone's architecture (or the config's `model` for scratch) with the
  stage's dtypes, remat, scan and LoRA settings and the given heads."""
  sm = stage_cfg.model
  lora_cfg = model_config_from(sm).lora
  runtime = dict(dtype=sm.dtype, param_dtype=sm.param_dtype, remat=sm.remat, scan_layers=sm.scan_layers,
                 lora=lora_cfg)
  if backbone.config is None:
    section = ctx.cfg.model.to_dict()
    section["vocab_size"] = section.get("vocab_size") or len(ctx.tokenizer)
    base = model_config_from(section)
  else:
    base = backbone.config
  tok = ctx.tokenizer
  ids = dict(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  return base.replace(**runtime, **ids, **heads)


def _pipeline(ctx: Context, rows: list[dict], stage_cfg: Any, kind: str, *, name: str, extra_fields=(),
              seq: str = "chosen", max_prompt_len: int | None = None, epochs: int | None = None,
              shuffle: bool = True, batch_size: int | None = None) -> Pipeline:
  d = ctx.cfg.data
  pc = PipelineConfig(kind=kind, batch_size=batch_size or stage_cfg.batch_size,
                      max_prompt_len=max_prompt_len or d.max_prompt_len, max_response_len=d.max_response_len,
                      bucket_multiple=d.bucket_multiple, template=d.template, sequence_responses=seq,
                      extra_fields=tuple(extra_fields), strict=d.mode == "strict", shuffle=shuffle,
                      seed=int(ctx.cfg.seed), num_epochs=epochs, drop_remainder=epochs is None, static_shapes=True)
  return Pipeline(rows, ctx.tokenizer, pc, name=name)


def _held_out(ctx: Context, rows: list[dict], stage_cfg: Any, kind: str, **kwargs) -> Pipeline | None:
  """One ordered pass over held-out `rows` (the last batch padded; the losses mask padded rows) for the
  engine's eval/ metrics, or None when `log.eval_every_steps` is 0 or nothing is held out."""
  if not rows or int(stage_cfg.log.get("eval_every_steps", 0)) <= 0:
    return None
  return _pipeline(ctx, rows, stage_cfg, kind, name="eval", epochs=1, shuffle=False, **kwargs)


def _lap(timings: dict, name: str, t0: float) -> None:
  timings[name] = round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------------------------------------
# Stages


def run_sft(ctx: Context, existing: str = "auto") -> str:
  """The reference policy: SFT on every scored response (pro.responses="responses") or on chosen."""
  scfg = ctx.cfg.sft
  bb = load_source(ctx.source(scfg.pro.source))
  mcfg = stage_model_config(ctx, scfg, bb, head="lm", value_head=False)
  seq = scfg.pro.responses
  rows = ctx.train if seq == "chosen" else [ex for ex in ctx.train if len(ex.get("responses", []))]
  pipe = _pipeline(ctx, rows, scfg, "sequence", name="train", seq=seq)
  held = _held_out(ctx, ctx.eval if seq == "chosen" else [ex for ex in ctx.eval if len(ex.get("responses", []))],
                   scfg, "sequence", seq=seq)
  ecfg = stage_engine_config(scfg, ctx.cfg.seed, mcfg)
  task = sft_task(ecfg, mcfg, pipe.batch_spec(), name="sft",
                  inputs=StageInputs(init=bb.params, data=pipe, extra={"tokenizer": ctx.tokenizer_path},
                                     eval_data=held))
  say(f"stage sft: {mcfg.num_params():,} params from {scfg.pro.source}, {scfg.total_steps} steps")
  _train(ecfg, ctx.path("sft"), task, existing)
  return ctx.path("sft")


def run_rm(ctx: Context, existing: str = "auto") -> dict[str, Any]:
  """The multi-head reward model (objectives `rm.pro.objectives`), with held-out pair accuracy."""
  rcfg = ctx.cfg.rm
  objectives = list(rcfg.pro.objectives) or ctx.objectives
  rows_tr = [remap_objectives(ex, objectives) for ex in ctx.train if ex.get("chosen") and ex.get("rejected")]
  rows_ev = [remap_objectives(ex, objectives) for ex in ctx.eval if ex.get("chosen") and ex.get("rejected")]
  bb_source = ctx.source(rcfg.pro.source)
  say(f"stage rm: {len(objectives)} heads {objectives} on {bb_source}, {rcfg.total_steps} steps")
  model, variables = train_reward_model(
      stage_engine_config(rcfg, ctx.cfg.seed, None), ctx.path("rm"), rows_tr, ctx.tokenizer, backbone_source=bb_source,
      objectives=objectives, model_config=stage_model_config(ctx, rcfg, Backbone(None, None, "scratch")),
      max_prompt_len=ctx.cfg.data.max_prompt_len, max_response_len=ctx.cfg.data.max_response_len,
      template=ctx.cfg.data.template, bucket_multiple=ctx.cfg.data.bucket_multiple, existing=existing,
      tokenizer_path=ctx.tokenizer_path, strict=ctx.cfg.data.mode == "strict",
      eval_examples=rows_ev if rcfg.log.eval_every_steps > 0 else None)
  pipe = _pipeline(ctx, rows_ev, rcfg, "pair", name="eval", epochs=1, shuffle=False)
  acc = pair_accuracy(model, variables, pipe, objectives)
  say("rm held-out accuracy: " + ", ".join(f"{o} {a:.3f} (n={acc['count'][o]})" for o, a in acc["accuracy"].items()))
  write_json(ctx.path("rm", "heldout.json"), acc)
  return acc


def run_adapter(ctx: Context, existing: str = "auto") -> dict[str, float]:
  acfg = ctx.cfg.adapter
  train_t = targets_for(ctx, ctx.train, acfg.pro.tau)
  backbone = ctx.source(acfg.pro.backbone)
  say(f"stage adapter: MLP over prompt features of {backbone}, {acfg.total_steps} steps")
  pref = train_adapter(stage_engine_config(acfg, ctx.cfg.seed, None), ctx.path("adapter"), ctx.train, train_t,
                         ctx.tokenizer, backbone_source=backbone, tokenizer_path=ctx.tokenizer_path,
                         objectives=ctx.objectives, hidden=acfg.pro.hidden, layers=acfg.pro.layers,
                         max_prompt_len=ctx.cfg.data.max_prompt_len, template=ctx.cfg.data.template,
                         bucket_multiple=ctx.cfg.data.bucket_multiple, existing=existing, name="train",
                         norm=ctx.norm, **({"eval_examples": ctx.eval, "eval_targets": targets_for(ctx, ctx.eval,
                                                                                                 acfg.pro.tau)}
                                           if acfg.log.eval_every_steps > 0 and ctx.eval else {}))
  w = pref([ex["prompt"] for ex in ctx.eval])
  metrics = evaluate_adapter(w, targets_for(ctx, ctx.eval, acfg.pro.tau))
  true_w = true_weights(ctx.eval)
  if true_w is not None:
    metrics["top1_vs_true_weights"] = float(np.mean(w.argmax(1) == true_w.argmax(1)))
  metrics["mean_weights"] = dict(zip(ctx.objectives, np.round(w.mean(0), 4).tolist()))
  say("adapter (held out): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
  write_json(ctx.path("adapter", "heldout.json"), metrics)
  return metrics


def run_policy(ctx: Context, existing: str = "auto") -> str:
  """The policy with prompt-aware weights: loss `policy.pro.loss`, weights `policy.pro.weights_source`."""
  pcfg = ctx.cfg.policy
  pro = pcfg.pro
  kind = pro.loss
  init = load_source(ctx.source(pro.init))
  placeholder, soft_id, n_soft = soft_conditioning(ctx) if kind == "ric" else ("", 0, 0)
  soft = dict(weight_tokens=n_soft, num_weights=ctx.K, weight_token_id=soft_id) if n_soft else {}
  mcfg = stage_model_config(ctx, pcfg, init, head="lm", value_head=kind == "ppo", **soft)
  extra = {"tokenizer": ctx.tokenizer_path, "objectives": ctx.objectives, "loss": kind,
           "weights_source": pro.weights_source,
           "conditioning": ("soft" if n_soft else "rewards" if pro.conditioning == "rewards" else "text")
                           if kind == "ric" else "none",
           "soft_placeholder": placeholder, "decimals": pro.decimals}
  if kind == "ric" and pro.conditioning == "rewards":
    extra["reward_map"] = _reward_map(ctx)
  if kind in ("ric", "ppo") + DPO_TYPE:  # these use the normalized rewards: keep the statistics with the run
    extra["norm"] = ctx.norm.to_dict()
  if kind == "ppo":
    return _run_ppo(ctx, extra, existing)
  ecfg = stage_engine_config(pcfg, ctx.cfg.seed, mcfg)
  if kind == "ric":
    rows = _ric_rows(ctx)
    pipe = _pipeline(ctx, rows, pcfg, "sequence", name="train-conditioned", max_prompt_len=pro.max_prompt_len,
                     extra_fields=("weights",) if n_soft else ())
    held = _held_out(ctx, _ric_rows(ctx, ctx.eval) if pcfg.log.eval_every_steps > 0 and ctx.eval else [], pcfg,
                     "sequence", max_prompt_len=pro.max_prompt_len, extra_fields=("weights",) if n_soft else ())
    task = sft_task(ecfg, mcfg, pipe.batch_spec(), name="policy",
                    inputs=StageInputs(init=init.params, data=pipe, extra=extra, eval_data=held))
  elif kind == "sft":
    pipe = _pipeline(ctx, ctx.train, pcfg, "sequence", name="train")
    task = sft_task(ecfg, mcfg, pipe.batch_spec(), name="policy",
                    inputs=StageInputs(init=init.params, data=pipe, extra=extra))
  elif kind in DPO_TYPE:
    rows, fields = _dpo_rows(ctx, pro)
    ref_source = ctx.source(pro.reference)
    same_as_init = ref_source == ctx.source(pro.init)
    ref = init if same_as_init else load_source(ref_source)
    ref_config, frozen = None, {}
    if pcfg.trainable == "lora" and same_as_init:
      ref_key = "base"  # the LoRA policy's own base weights are the reference
    else:
      ref_key = "ref"
      ref_config = stage_model_config(ctx, pcfg, ref, head="lm", value_head=False).replace(lora=None)
      frozen = {"ref": {"params": ref.params}}
    if pro.precompute_reference:
      ref_model = Transformer(mcfg.replace(lora=None, value_head=False))
      pass_pipe = _pipeline(ctx, rows, pcfg, "pair", name="train", epochs=1, shuffle=False)
      logps = precompute_reference_logps(ref_model, {"params": ref.params}, pass_pipe, ctx.cfg.data.max_response_len,
                                         average=kind == "dpo" and pro.dpo_loss_type == "ipo")
      for i, r in enumerate(rows):
        r["ref_chosen_logp"], r["ref_rejected_logp"] = logps[i]
      fields += ("ref_chosen_logp", "ref_rejected_logp")
      ref_key, frozen = "batch", {}
    pipe = _pipeline(ctx, rows, pcfg, "pair", name="train", extra_fields=fields)
    # held-out pairs (reward accuracy / margins under eval/); not with precomputed reference log-probs
    held = _held_out(ctx, _dpo_rows(ctx, pro, ctx.eval)[0] if pcfg.log.eval_every_steps > 0 and ctx.eval
                     and not pro.precompute_reference else [], pcfg, "pair", extra_fields=fields)
    # the pair pipeline keeps responses within max_response_len: the LM head runs on those slots only
    task = dpo_task(ecfg, mcfg, pipe.batch_spec(), kind, beta=pro.beta, ref_key=ref_key, ref_config=ref_config,
                    response_window=ctx.cfg.data.max_response_len, name="policy",
                    dpo_loss_type=pro.dpo_loss_type, label_smoothing=pro.label_smoothing,
                    inputs=StageInputs(init=init.params, frozen=frozen, data=pipe, extra=extra, eval_data=held))
  else:
    raise ValueError(f"policy.pro.loss must be one of sft, ric, dpo, wdpo, modpo, ppo; got {kind!r}")
  say(f"stage policy: {kind} with weights {pro.weights_source}, from {pro.init}, {pcfg.total_steps} steps")
  _train(ecfg, ctx.path(pro.name), task, existing)
  return ctx.path(pro.name)


def _dpo_rows(ctx: Context, pro: Any, examples: list[dict] | None = None) -> tuple[list[dict], tuple[str, ...]]:
  """The pair rows of a DPO-type policy with their weights and normalized rewards. MODPO fits its DPO
  term on objective 0's own preference pairs: rows without a label for objective 0
  (pair_objectives[0] == 0) are left out (the loss also masks them)."""
  rows = [dict(ex) for ex in (ctx.train if examples is None else examples) if ex.get("chosen") and ex.get("rejected")]
  if pro.loss == "modpo":
    n_all = len(rows)
    rows = [r for r in rows if r["pair_objectives"][0] != 0]
    if not rows:
      raise ValueError(f"modpo: none of the {n_all} training pairs has a label for objective 0 "
                       f"({ctx.objectives[0]!r}, pair_objectives[0]); MODPO fits objective 0 on its own pairs")
    say(f"modpo: {len(rows)} of {n_all} pairs are labelled for objective 0 ({ctx.objectives[0]})")
  norm = ctx.norm
  rc = norm.apply(ctx.score([r["prompt"] for r in rows], [r["chosen"] for r in rows]))
  rr = norm.apply(ctx.score([r["prompt"] for r in rows], [r["rejected"] for r in rows]))
  w = example_weights(ctx, rows, pro.weights_source, pro.tau)
  for i, r in enumerate(rows):
    r["weights"], r["reward_chosen"], r["reward_rejected"] = w[i].tolist(), rc[i].tolist(), rr[i].tolist()
  return rows, ("weights", "reward_chosen", "reward_rejected")


def _ric_rows(ctx: Context, examples: list[dict] | None = None) -> list[dict]:
  pro = ctx.cfg.policy.pro
  placeholder, _, n_soft = soft_conditioning(ctx)
  soft = dict(soft_placeholder=placeholder, soft_tokens=n_soft)
  rows = [ex for ex in (ctx.train if examples is None else examples) if len(responses_of(ex)) >= 1]
  scored = []
  for ex in rows:
    resp = responses_of(ex)
    scored.append(dict(ex, responses=resp))
  flat_p = [ex["prompt"] for ex in scored for _ in ex["responses"]]
  flat_r = [r for ex in scored for r in ex["responses"]]
  z_all = ctx.norm.apply(ctx.score(flat_p, flat_r))
  z, i = [], 0
  for ex in scored:
    z.append(z_all[i:i + len(ex["responses"])])
    i += len(ex["responses"])
  if pro.conditioning == "own":
    w = [np.asarray(target_weights(zi, pro.tau)) for zi in z]
    return ric_examples(scored, w, ctx.objectives, pro.decimals, **soft)
  if pro.conditioning == "best_of":
    return best_of_examples(scored, z, ctx.objectives, pro.samples, seed=int(ctx.cfg.seed), decimals=pro.decimals,
                            concentration=pro.concentration, **soft)
  if pro.conditioning == "rewards":  # RiC proper: condition on the response's own normalized rewards
    if n_soft:
      raise ValueError("policy.pro.conditioning='rewards' (RiC proper) is text conditioning: set conditioning_mode='text'")
    return reward_conditioned_examples(scored, z, ctx.objectives, pro.decimals)
  raise ValueError(f"policy.pro.conditioning must be 'own', 'best_of' or 'rewards', got {pro.conditioning!r}")


def _reward_map(ctx: Context) -> dict:
  """RiC's preference-to-reward map for a reward-conditioned policy: the range [low, high] of the
  training responses' normalized rewards (RiC: the 0 and 1 quantiles of its reference rewards)."""
  pro = ctx.cfg.policy.pro
  rows = [ex for ex in ctx.train if len(responses_of(ex)) >= 1]
  z = ctx.norm.apply(ctx.score([ex["prompt"] for ex in rows for _ in responses_of(ex)],
                               [r for ex in rows for r in responses_of(ex)]))
  return {"low": np.asarray(z).min(0).tolist(), "high": np.asarray(z).max(0).tolist(), "method": pro.ric_reward_map,
          "decimals": int(pro.decimals)}


def _run_ppo(ctx: Context, extra: dict, existing: str) -> str:
  """MORLHF-PPO (`pro_jax.stages.ppo.run_ppo`) with the prompts' weights from `weights_source`."""
  pcfg, pro = ctx.cfg.policy, ctx.cfg.policy.pro
  pp = pro.ppo
  w = example_weights(ctx, ctx.train, pro.weights_source, pro.tau)
  ppo = ppo_config(ctx.cfg)
  reference = None
  if ctx.source(pro.reference) != ctx.source(pro.init):
    ref = load_source(ctx.source(pro.reference))
    reference = (ref.config, ref.params)
  say(f"stage policy: MORLHF-PPO with weights {pro.weights_source}, {pp.iterations} iterations of "
      f"{pp.rollout_batch} rollouts")
  result = run_ppo(stage_engine_config(pcfg, ctx.cfg.seed, None), ctx.path(pro.name), policy=ctx.source(pro.init),
                   prompts=ctx.train, tokenizer=ctx.tokenizer, scorer=ctx.scorer, norm=ctx.norm, weights=w, ppo=ppo,
                   reference=reference, existing=existing, extra=extra)
  raise_if_preempted(result, ctx.path(pro.name), unit="iteration")
  return ctx.path(pro.name)


def run_stage(name: str, cfg: Any, workdir: str, *, existing: str = "auto", ctx: Context | None = None) -> Any:
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
  if ctx is None:  # a stage on its own: read and check everything, then write (run_pipeline did for its stages)
    ctx = load_context(cfg, workdir)
    check_stages(ctx, (name,))
  ctx.write_workdir()
  if name == "eval":
    return evaluate.run_eval(ctx)
  return {"sft": run_sft, "rm": run_rm, "adapter": run_adapter, "policy": run_policy}[name](ctx, existing)


def run_pipeline(cfg: Any, workdir: str, *, stages: tuple[str, ...] | None = None,
                 existing: str = "auto") -> dict[str, Any]:
  """Run the stages in order (default: all that the config enables) and return the eval report."""
  t0 = time.perf_counter()
  timings: dict[str, float] = {}
  t = time.perf_counter()
  ctx = load_context(cfg, workdir)
  if stages is None:
    stages = tuple(s for s in STAGES if s != "rm" or "rm" in tuple(cfg.scorers))
    if cfg.sft.pro.source == "" :
      stages = tuple(s for s in stages if s != "sft")
  check_stages(ctx, stages)  # every stage's config, sources and scorers before the first write
  ctx.write_workdir()
  say(f"data: {len(ctx.train)} train / {len(ctx.eval)} eval prompts, objectives {ctx.objectives}, "
      f"tokenizer of {len(ctx.tokenizer)} tokens")
  _lap(timings, "data", t)
  report: dict[str, Any] = {}
  extra: dict[str, Any] = {}
  for name in stages:
    t = time.perf_counter()
    out = run_stage(name, cfg, workdir, existing=existing, ctx=ctx)
    if name == "adapter":
      extra["adapter_heldout"] = out
    if name == "rm":
      extra["rm_heldout"] = out
    if name == "eval":
      report = out
    _lap(timings, name, t)
  timings["total"] = round(time.perf_counter() - t0, 1)
  if report:
    report.update(extra)
    report["timings_s"] = timings
    evaluate.write_report(report, ctx.path("report"), title=f"PRO evaluation (seed {int(cfg.seed)})",
                          wandb_project=cfg.policy.log.wandb_project or None)
  return report
