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

Config sections (see `pro_jax/configs/demo.py` for a complete example):

* ``objectives``: the K objective names (the order of every weight vector).
* ``data``: ``sources`` ("synthetic" = the embedded task; else "BUILDER/CONFIG:SPLIT" read with
  `pro_jax.data.sources.load_examples` from ``manual_dir`` or prepared ``data_dir``), optional
  ``eval_sources`` (else ``eval_fraction`` of the rows is held out), lengths, template, validation mode.
* ``task``: the embedded task's sizes (used by the "synthetic" source and scorer).
* ``tokenizer``: "" = the embedded task's own tokenizer; a directory or SentencePiece ``.model``.
* ``model``: the architecture for ``scratch`` sources.
* ``scorers``: how the K objectives are scored: "synthetic" (programmatic), "rm" (the rm stage's
  heads), "hf:DIR=NAME" (an imported HF sequence classifier as objective NAME).
* ``norm``: normalization method. ``sft`` / ``rm`` / ``adapter`` / ``policy``: engine configs of the
  stages, each with a ``pro`` section; ``eval``: the comparison.

Model sources in ``pro`` sections: "scratch", "stage:sft" (W/sft), "checkpoint:DIR", "hf:DIR",
"llama2c:FILE".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from pro_jax.data import synthetic as S
from pro_jax.data.pipeline import Pipeline, PipelineConfig
from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.stages import adapter as A
from pro_jax.stages import evaluate as E
from pro_jax.models.sources import Backbone, load_source
from pro_jax.pro.normalize import NormStats, fit_norm_stats
from pro_jax.stages.policy import (DPO_TYPE, best_of_examples, policy_loss, precompute_reference_logps,
                                resolve_example_weights, ric_examples)
from pro_jax.stages.scoring import CachedScorer, StackedScorer, scorer_key
from pro_jax.stages.stage import make_task
from pro_jax.pro.weights import simplex_grid
from pro_jax.train.config import model_config_from
from pro_jax.train.trainer import train

log = logging.getLogger("pro_jax")
STAGES = ("sft", "rm", "adapter", "policy", "eval")


def say(msg: str) -> None:
  print(f"[pro-jax] {msg}", flush=True)


class Preempted(RuntimeError):
  """A stage's engine run was stopped by SIGTERM after saving a checkpoint: rerun to resume."""


def _train(cfg: Any, workdir: str, task: Any, existing: str) -> Any:
  result = train(cfg, workdir, task, existing=existing)
  if result.status == "preempted":
    raise Preempted(f"{workdir}: preempted at step {result.step}; checkpoint saved; rerun the command to resume")
  return result


# ---------------------------------------------------------------------------------------------
# The shared context: data, tokenizer, objectives, scorers, normalization


@dataclasses.dataclass
class Context:
  cfg: Any
  workdir: str
  objectives: list[str]
  tokenizer: Any
  tokenizer_path: str
  train: list[dict]
  eval: list[dict]
  task_config: S.SyntheticTaskConfig | None = None
  _scorer: Any = None
  _norm: NormStats | None = None

  @property
  def K(self) -> int:
    return len(self.objectives)

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def source(self, spec: str) -> str:
    """Resolve "stage:NAME" to this workdir's stage run."""
    if spec.startswith("stage:"):
      name = spec.partition(":")[2]
      if not os.path.isdir(self.path(name, "checkpoints")):
        raise FileNotFoundError(f"{self.path(name)} holds no checkpoint: run `pro-jax {name}` with this "
                                "workdir first")
      return f"checkpoint:{self.path(name)}"
    return spec

  @property
  def scorer(self) -> Any:
    if self._scorer is None:
      self._scorer = build_scorer(self)
    return self._scorer

  @property
  def norm(self) -> NormStats:
    if self._norm is None:
      self._norm = fit_or_load_norm(self)
    return self._norm

  def score(self, prompts, responses) -> np.ndarray:
    return np.asarray(self.scorer.score(list(prompts), list(responses)), np.float32)


def _synthetic_config(cfg: Any) -> S.SyntheticTaskConfig:
  t = cfg.task
  return S.SyntheticTaskConfig(seed=int(cfg.seed), n_train=t.n_train, n_eval=t.n_eval, n_candidates=t.n_candidates,
                               label_noise=t.label_noise, humor=t.humor)


def _remap(ex: dict, objectives: list[str]) -> dict:
  """The example with its objective-indexed fields in the pipeline's objective order (0 = absent)."""
  own = list(ex["objectives"])
  if own == objectives:
    return ex
  idx = [own.index(o) if o in own else -1 for o in objectives]

  def pick(vec):
    v = np.asarray(vec, np.float32)
    return [float(v[..., i]) if i >= 0 else 0.0 for i in idx] if v.ndim == 1 else \
        [[float(row[i]) if i >= 0 else 0.0 for i in idx] for row in v]

  out = dict(ex, objectives=list(objectives), pair_objectives=pick(ex["pair_objectives"]))
  if len(ex.get("scores", [])):
    out["scores"], out["score_mask"] = pick(ex["scores"]), pick(ex["score_mask"])
  return out


def load_context(cfg: Any, workdir: str) -> Context:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  objectives = list(cfg.objectives)
  d = cfg.data
  task_cfg = None
  if tuple(d.sources) == ("synthetic",):
    task_cfg = _synthetic_config(cfg)
    if list(task_cfg.objectives) != objectives:
      raise ValueError(f"objectives {objectives} differ from the synthetic task's {list(task_cfg.objectives)}")
    data = S.generate_task(task_cfg)
    train_ex, eval_ex = data["train"], data["eval"]
  else:
    from pro_jax.data.sources import load_examples
    def read(specs):
      rows = []
      for spec in specs:
        name, _, split = spec.rpartition(":")
        if not name:
          raise ValueError(f"data source {spec!r}: expected BUILDER/CONFIG:SPLIT")
        rows += load_examples(name, split, manual_dir=d.manual_dir or None, data_dir=d.data_dir or None,
                              mode=d.mode)
      return [_remap(ex, objectives) for ex in rows]
    rows = read(d.sources)
    if d.eval_sources:
      train_ex, eval_ex = rows, read(d.eval_sources)
    else:
      order = np.random.default_rng(int(cfg.seed)).permutation(len(rows))
      n_eval = max(1, int(round(d.eval_fraction * len(rows))))
      eval_ex = [rows[i] for i in sorted(order[:n_eval])]
      train_ex = [rows[i] for i in sorted(order[n_eval:])]
    if d.max_eval and len(eval_ex) > d.max_eval:
      eval_ex = eval_ex[:d.max_eval]
  tokenizer, tok_path = _tokenizer(cfg, workdir, task_cfg)
  return Context(cfg, workdir, objectives, tokenizer, tok_path, list(train_ex), list(eval_ex), task_cfg)


def _tokenizer(cfg: Any, workdir: str, task_cfg: S.SyntheticTaskConfig | None) -> tuple[Any, str]:
  from transformers import AutoTokenizer
  if not cfg.tokenizer:
    if task_cfg is None:
      raise ValueError("config.tokenizer is empty: only the synthetic task brings its own tokenizer")
    path = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
      S.build_tokenizer(task_cfg, path)
    return AutoTokenizer.from_pretrained(path), path
  from pro_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(cfg.tokenizer), str(cfg.tokenizer)


def build_scorer(ctx: Context) -> Any:
  """The K objectives' scorers (stacked, reordered to `objectives`), cached in W/scores.sqlite."""
  parts = []
  for spec in ctx.cfg.scorers:
    if spec == "synthetic":
      parts.append(S.SyntheticRewards(ctx.task_config or _synthetic_config(ctx.cfg)))
    elif spec == "rm":
      from pro_jax.stages.rm import load_reward_model
      parts.append(load_reward_model(ctx.path("rm")))
    elif spec.startswith("hf:"):
      from pro_jax.stages.rm import hf_reward_scorer
      path, _, name = spec[3:].rpartition("=")
      if not path or not name:
        raise ValueError(f"scorer {spec!r}: expected hf:DIR=OBJECTIVE")
      parts.append(hf_reward_scorer(path, name))
    else:
      raise ValueError(f"unknown scorer {spec!r} (synthetic, rm, hf:DIR=OBJECTIVE)")
  stacked = parts[0] if len(parts) == 1 else StackedScorer(parts)
  have = list(stacked.objectives)
  missing = [o for o in ctx.objectives if o not in have]
  if missing:
    raise ValueError(f"no scorer gives objective(s) {missing} (scorers {list(ctx.cfg.scorers)} give {have})")
  if have != ctx.objectives:
    stacked = _Reordered(stacked, [have.index(o) for o in ctx.objectives], ctx.objectives)
  # the cache key identifies what is computed (each scorer's config / weight fingerprint, the order),
  # so a retrained reward model or another task seed never reads stale scores
  return CachedScorer(stacked, ctx.path("scores.sqlite"))


class _Reordered:
  def __init__(self, scorer, index, objectives):
    self.scorer, self.index, self.objectives = scorer, list(index), tuple(objectives)
    self.key = json.dumps([scorer_key(scorer), self.index])

  def score(self, prompts, responses):
    return np.asarray(self.scorer.score(prompts, responses), np.float32)[:, self.index]


def _responses(ex: dict) -> list[str]:
  """The scored responses of an example: its `responses`, else its pair."""
  if len(ex.get("responses", [])):
    return list(ex["responses"])
  return [r for r in (ex.get("chosen"), ex.get("rejected")) if r]


def fit_or_load_norm(ctx: Context) -> NormStats:
  path = ctx.path("norm.json")
  if os.path.exists(path):
    norm = NormStats.load(path)
    if list(norm.objectives) == ctx.objectives and norm.method == ctx.cfg.norm.method:
      return norm
  prompts = [ex["prompt"] for ex in ctx.train for _ in _responses(ex)]
  responses = [r for ex in ctx.train for r in _responses(ex)]
  norm = fit_norm_stats(ctx.score(prompts, responses), ctx.objectives, method=ctx.cfg.norm.method)
  norm.save(path)
  return norm


def targets_for(ctx: Context, examples: list[dict], tau: float) -> np.ndarray:
  """Adapter targets w*(x) = softmax(r~(x, y_w) / tau) from each prompt's preferred response."""
  raw = ctx.score([ex["prompt"] for ex in examples], [ex["chosen"] for ex in examples])
  return A.compute_targets(raw, ctx.norm, tau)


# ---------------------------------------------------------------------------------------------
# Stage plumbing


def stage_engine_config(stage_cfg: Any, cfg: Any, mcfg: ModelConfig | None) -> Any:
  """The stage's engine config with the pipeline's seed, and its model section showing `mcfg`."""
  c = copy.deepcopy(stage_cfg)
  c.seed = int(cfg.seed)
  if mcfg is not None:
    for k, v in mcfg.to_dict().items():
      if k in c.model and k not in ("lora", "rope_scaling"):
        c.model[k] = v
  return c


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


def _lap(timings: dict, name: str, t0: float) -> None:
  timings[name] = round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------------------------------------
# Stages


def run_sft(ctx: Context, existing: str = "auto") -> str:
  """The reference policy: SFT on every scored response (pro.responses="responses") or on chosen."""
  scfg = ctx.cfg.sft
  bb = load_source(ctx.source(scfg.pro.source))
  mcfg = stage_model_config(ctx, scfg, bb, head="lm", value_head=False)
  model = Transformer(mcfg)
  seq = scfg.pro.responses
  rows = ctx.train if seq == "chosen" else [ex for ex in ctx.train if len(ex.get("responses", []))]
  pipe = _pipeline(ctx, rows, scfg, "sequence", name="train", seq=seq)
  task = make_task(model, policy_loss("sft", model), pipe, init=lambda rng: init_variables(model, rng),
                   backbone_params=bb.params,
                   name="sft", extra={"tokenizer": ctx.tokenizer_path})
  say(f"stage sft: {mcfg.num_params():,} params from {scfg.pro.source}, {scfg.total_steps} steps")
  _train(stage_engine_config(scfg, ctx.cfg, mcfg), ctx.path("sft"), task, existing)
  return ctx.path("sft")


def run_rm(ctx: Context, existing: str = "auto") -> dict[str, Any]:
  """The multi-head reward model (objectives `rm.pro.objectives`), with held-out pair accuracy."""
  from pro_jax.stages.rm import pair_accuracy, train_reward_model
  rcfg = ctx.cfg.rm
  objectives = list(rcfg.pro.objectives) or ctx.objectives
  rows_tr = [_remap(ex, objectives) for ex in ctx.train if ex.get("chosen") and ex.get("rejected")]
  rows_ev = [_remap(ex, objectives) for ex in ctx.eval if ex.get("chosen") and ex.get("rejected")]
  bb_source = ctx.source(rcfg.pro.source)
  say(f"stage rm: {len(objectives)} heads {objectives} on {bb_source}, {rcfg.total_steps} steps")
  model, variables = train_reward_model(
      stage_engine_config(rcfg, ctx.cfg, None), ctx.path("rm"), rows_tr, ctx.tokenizer, backbone_source=bb_source,
      objectives=objectives, model_config=stage_model_config(ctx, rcfg, Backbone(None, None, "scratch")),
      max_prompt_len=ctx.cfg.data.max_prompt_len, max_response_len=ctx.cfg.data.max_response_len,
      template=ctx.cfg.data.template, bucket_multiple=ctx.cfg.data.bucket_multiple, existing=existing,
      tokenizer_path=ctx.tokenizer_path)
  pipe = _pipeline(ctx, rows_ev, rcfg, "pair", name="eval", epochs=1, shuffle=False)
  acc = pair_accuracy(model, variables, pipe, objectives)
  say("rm held-out accuracy: " + ", ".join(f"{o} {a:.3f} (n={acc['count'][o]})" for o, a in acc["accuracy"].items()))
  _write_json(ctx.path("rm", "heldout.json"), acc)
  return acc


def run_adapter(ctx: Context, existing: str = "auto") -> dict[str, float]:
  acfg = ctx.cfg.adapter
  train_t = targets_for(ctx, ctx.train, acfg.pro.tau)
  backbone = ctx.source(acfg.pro.backbone)
  say(f"stage adapter: MLP over prompt features of {backbone}, {acfg.total_steps} steps")
  pref = A.train_adapter(stage_engine_config(acfg, ctx.cfg, None), ctx.path("adapter"), ctx.train, train_t,
                         ctx.tokenizer, backbone_source=backbone, tokenizer_path=ctx.tokenizer_path,
                         objectives=ctx.objectives, hidden=acfg.pro.hidden, layers=acfg.pro.layers,
                         max_prompt_len=ctx.cfg.data.max_prompt_len, template=ctx.cfg.data.template,
                         bucket_multiple=ctx.cfg.data.bucket_multiple, existing=existing, name="train",
                         norm=ctx.norm)
  w = pref([ex["prompt"] for ex in ctx.eval])
  metrics = A.evaluate_adapter(w, targets_for(ctx, ctx.eval, acfg.pro.tau))
  true_w = _true_weights(ctx.eval)
  if true_w is not None:
    metrics["top1_vs_true_weights"] = float(np.mean(w.argmax(1) == true_w.argmax(1)))
  metrics["mean_weights"] = dict(zip(ctx.objectives, np.round(w.mean(0), 4).tolist()))
  say("adapter (held out): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
  _write_json(ctx.path("adapter", "heldout.json"), metrics)
  return metrics


def _true_weights(examples: list[dict]) -> np.ndarray | None:
  if examples and all("true_weights" in ex for ex in examples):
    return np.asarray([ex["true_weights"] for ex in examples], np.float32)
  return None


def run_policy(ctx: Context, existing: str = "auto") -> str:
  """The policy with prompt-aware weights: loss `policy.pro.loss`, weights `policy.pro.weights_source`."""
  pcfg = ctx.cfg.policy
  pro = pcfg.pro
  kind = pro.loss
  init = load_source(ctx.source(pro.init))
  placeholder, soft_id, n_soft = _soft(ctx) if kind == "ric" else ("", 0, 0)
  soft = dict(weight_tokens=n_soft, num_weights=ctx.K, weight_token_id=soft_id) if n_soft else {}
  mcfg = stage_model_config(ctx, pcfg, init, head="lm", value_head=kind == "ppo", **soft)
  model = Transformer(mcfg)
  extra = {"tokenizer": ctx.tokenizer_path, "objectives": ctx.objectives, "loss": kind,
           "weights_source": pro.weights_source,
           "conditioning": ("soft" if n_soft else "text") if kind == "ric" else "none",
           "soft_placeholder": placeholder, "decimals": pro.decimals}
  if kind in ("ric", "ppo") + DPO_TYPE:  # these use the normalized rewards: keep the statistics with the run
    extra["norm"] = ctx.norm.to_dict()
  if kind == "ppo":
    return _run_ppo(ctx, model, init, extra, existing)
  if kind == "ric":
    rows = _ric_rows(ctx)
    pipe = _pipeline(ctx, rows, pcfg, "sequence", name="train-conditioned", max_prompt_len=pro.max_prompt_len,
                     extra_fields=("weights",) if n_soft else ())
    loss, frozen = policy_loss("sft", model), None
  elif kind == "sft":
    pipe = _pipeline(ctx, ctx.train, pcfg, "sequence", name="train")
    loss, frozen = policy_loss("sft", model), None
  elif kind in DPO_TYPE:
    rows, fields = _dpo_rows(ctx, pro)
    ref_source = ctx.source(pro.reference)
    same_as_init = ref_source == ctx.source(pro.init)
    if pcfg.trainable == "lora" and same_as_init:
      ref_key, frozen = "base", None  # the LoRA policy's own base weights are the reference
    else:
      ref_key = "ref"
      ref = init if same_as_init else load_source(ref_source)
      ref_model = Transformer(stage_model_config(ctx, pcfg, ref, head="lm", value_head=False).replace(lora=None))
      frozen = {"ref": (ref_model, {"params": ref.params})}
    if pro.precompute_reference:
      ref_model = Transformer(mcfg.replace(lora=None, value_head=False))
      ref_vars = {"params": (init if ref_key == "base" else load_source(ref_source)).params}
      pass_pipe = _pipeline(ctx, rows, pcfg, "pair", name="train", epochs=1, shuffle=False)
      logps = precompute_reference_logps(ref_model, ref_vars, pass_pipe, ctx.cfg.data.max_response_len)
      for i, r in enumerate(rows):
        r["ref_chosen_logp"], r["ref_rejected_logp"] = logps[i]
      fields += ("ref_chosen_logp", "ref_rejected_logp")
      ref_key, frozen = "batch", None
    pipe = _pipeline(ctx, rows, pcfg, "pair", name="train", extra_fields=fields)
    # the pair pipeline keeps responses within max_response_len: the LM head runs on those slots only
    loss = policy_loss(kind, model, beta=pro.beta, ref_key=ref_key, response_window=ctx.cfg.data.max_response_len)
  else:
    raise ValueError(f"policy.pro.loss must be one of sft, ric, dpo, wdpo, modpo, ppo; got {kind!r}")
  task = make_task(model, loss, pipe, init=lambda rng: init_variables(model, rng), backbone_params=init.params,
                   frozen=frozen,
                   name="policy", extra=extra)
  say(f"stage policy: {kind} with weights {pro.weights_source}, from {pro.init}, {pcfg.total_steps} steps")
  _train(stage_engine_config(pcfg, ctx.cfg, mcfg), ctx.path(pro.name), task, existing)
  return ctx.path(pro.name)


def _adapter_weights(ctx: Context, examples: list[dict]) -> np.ndarray:
  pref = A.load_adapter(ctx.path("adapter"))
  if list(pref.objectives) != ctx.objectives:
    raise ValueError(f"the adapter in {ctx.path('adapter')} is for {list(pref.objectives)}, not {ctx.objectives}")
  return pref([ex["prompt"] for ex in examples])


def example_weights(ctx: Context, examples: list[dict], source: str, tau: float) -> np.ndarray:
  return resolve_example_weights(source, len(examples), ctx.K,
                                 targets_NxK=targets_for(ctx, examples, tau) if source == "target" else None,
                                 adapter_fn=lambda: _adapter_weights(ctx, examples))


def _dpo_rows(ctx: Context, pro: Any) -> tuple[list[dict], tuple[str, ...]]:
  rows = [dict(ex) for ex in ctx.train if ex.get("chosen") and ex.get("rejected")]
  norm = ctx.norm
  rc = norm.apply(ctx.score([r["prompt"] for r in rows], [r["chosen"] for r in rows]))
  rr = norm.apply(ctx.score([r["prompt"] for r in rows], [r["rejected"] for r in rows]))
  w = example_weights(ctx, rows, pro.weights_source, pro.tau)
  for i, r in enumerate(rows):
    r["weights"], r["reward_chosen"], r["reward_rejected"] = w[i].tolist(), rc[i].tolist(), rr[i].tolist()
  return rows, ("weights", "reward_chosen", "reward_rejected")


def soft_placeholder(tokenizer: Any) -> tuple[str, int]:
  """(string, id) of the token that carries soft weight embeddings: the tokenizer's unk (else pad)
  token, checked to encode as exactly that one id inside text."""
  for name in ("unk_token", "pad_token"):
    tok = getattr(tokenizer, name, None)
    if tok:
      tid = tokenizer.convert_tokens_to_ids(tok)
      if tokenizer(f"a {tok} {tok}", add_special_tokens=False)["input_ids"][-2:] == [tid, tid]:
        return tok, int(tid)
  raise ValueError("soft weight tokens need a tokenizer whose unk or pad token encodes as one id in text")


def _soft(ctx: Context) -> tuple[str, int, int]:
  """(placeholder, id, n) for policy.pro.conditioning_mode='soft', else ("", 0, 0)."""
  pro = ctx.cfg.policy.pro
  if pro.conditioning_mode == "text":
    return "", 0, 0
  if pro.conditioning_mode != "soft":
    raise ValueError(f"policy.pro.conditioning_mode must be 'text' or 'soft', got {pro.conditioning_mode!r}")
  placeholder, tid = soft_placeholder(ctx.tokenizer)
  return placeholder, tid, int(pro.soft_tokens)


def _ric_rows(ctx: Context) -> list[dict]:
  pro = ctx.cfg.policy.pro
  placeholder, _, n_soft = _soft(ctx)
  soft = dict(soft_placeholder=placeholder, soft_tokens=n_soft)
  rows = [ex for ex in ctx.train if len(_responses(ex)) >= 1]
  scored = []
  for ex in rows:
    resp = _responses(ex)
    scored.append(dict(ex, responses=resp))
  flat_p = [ex["prompt"] for ex in scored for _ in ex["responses"]]
  flat_r = [r for ex in scored for r in ex["responses"]]
  z_all = ctx.norm.apply(ctx.score(flat_p, flat_r))
  z, i = [], 0
  for ex in scored:
    z.append(z_all[i:i + len(ex["responses"])])
    i += len(ex["responses"])
  if pro.conditioning == "own":
    from pro_jax.pro.weights import target_weights
    w = [np.asarray(target_weights(zi, pro.tau)) for zi in z]
    return ric_examples(scored, w, ctx.objectives, pro.decimals, **soft)
  if pro.conditioning == "best_of":
    return best_of_examples(scored, z, ctx.objectives, pro.samples, seed=int(ctx.cfg.seed), decimals=pro.decimals,
                            concentration=pro.concentration, **soft)
  raise ValueError(f"policy.pro.conditioning must be 'own' or 'best_of', got {pro.conditioning!r}")


def _run_ppo(ctx: Context, model: Transformer, init: Backbone, extra: dict, existing: str) -> str:
  """MORLHF-PPO (`pro_jax.stages.ppo.run_ppo`) with the prompts' weights from `weights_source`."""
  from pro_jax.stages.ppo import PPOConfig, run_ppo
  del model
  pcfg, pro = ctx.cfg.policy, ctx.cfg.policy.pro
  pp = pro.ppo
  w = example_weights(ctx, ctx.train, pro.weights_source, pro.tau)
  ppo = PPOConfig(iterations=pp.iterations, rollout_batch=pp.rollout_batch, minibatch=pp.minibatch,
                  ppo_epochs=pp.ppo_epochs, max_prompt_len=ctx.cfg.data.max_prompt_len,
                  max_new_tokens=pp.max_new_tokens, temperature=pp.temperature, top_k=pp.top_k, top_p=pp.top_p,
                  kl_coef=pp.kl_coef, adaptive_kl=pp.adaptive_kl, kl_target=pp.kl_target, kl_horizon=pp.kl_horizon,
                  gamma=pp.gamma, lam=pp.lam, whiten_advantages=pp.whiten_advantages, clip_eps=pp.clip_eps,
                  vf_coef=pp.vf_coef, vf_clip=pp.vf_clip, entropy_coef=pp.entropy_coef,
                  reward_clip=pp.reward_clip if pp.reward_clip > 0 else None, template=ctx.cfg.data.template)
  reference = None
  if ctx.source(pro.reference) != ctx.source(pro.init):
    ref = load_source(ctx.source(pro.reference))
    reference = (ref.config, ref.params)
  say(f"stage policy: MORLHF-PPO with weights {pro.weights_source}, {pp.iterations} iterations of "
      f"{pp.rollout_batch} rollouts")
  result = run_ppo(stage_engine_config(pcfg, ctx.cfg, None), ctx.path(pro.name), policy=ctx.source(pro.init),
                   prompts=ctx.train, tokenizer=ctx.tokenizer, scorer=ctx.scorer, norm=ctx.norm, weights=w, ppo=ppo,
                   reference=reference, existing=existing, extra=extra)
  if result.status == "preempted":
    raise Preempted(f"{ctx.path(pro.name)}: preempted at iteration {result.iteration}; rerun to resume")
  return ctx.path(pro.name)


def _fixed_name(w: np.ndarray) -> str:
  return "fixed(" + ",".join(f"{x:.2f}" for x in w) + ")"


def run_eval(ctx: Context) -> dict[str, Any]:
  """PRO against fixed weights on held-out prompts.

  A weight-conditioned policy (`policy.pro.loss="ric"`) is one model: PRO = the adapter's f(x) in its
  prompts, each fixed setting = one vector of the `eval.grid_step` simplex grid, plus the oracle (the
  true weights, when the data has them). Unconditioned policies (dpo / wdpo / modpo / ppo / sft) are
  one model per weighting: list their run directories (subdirectories of the workdir, each trained
  with `--config.policy.pro.name=...` and its own `weights_source`) in `eval.policies`; the run trained
  with the adapter's weights is PRO, those with fixed / uniform weights are the fixed settings.
  """
  ecfg = ctx.cfg.eval
  from pro_jax.train.checkpoint import load_checkpoint
  runs = list(ecfg.policies) or [ctx.cfg.policy.pro.name]
  examples = ctx.eval[:ecfg.max_prompts] if ecfg.max_prompts else ctx.eval
  prompts = [ex["prompt"] for ex in examples]
  N, K = len(examples), ctx.K
  true_w = _true_weights(examples)
  target_w = targets_for(ctx, examples, ctx.cfg.adapter.pro.tau) if all(ex.get("chosen") for ex in examples) else None
  if ecfg.utility_weights == "true" and true_w is not None:
    uw, uw_name = true_w, "true"
  elif target_w is not None:
    uw, uw_name = target_w, "target"
  else:
    raise ValueError("eval needs utility weights: the examples' true weights or a preferred response per prompt")

  def load_policy(run: str) -> tuple[E.Policy, dict]:
    meta = load_checkpoint(ctx.path(run)).extra or {}
    src = load_source(f"checkpoint:{ctx.path(run)}")
    model = Transformer(src.config.replace(value_head=False))
    mode = meta.get("conditioning")
    return E.Policy(run, model, {"params": src.params}, conditioned=mode in ("text", "soft"),
                    soft_placeholder=meta.get("soft_placeholder", ""),
                    soft_tokens=src.config.weight_tokens if mode == "soft" else 0), meta

  settings: dict[str, np.ndarray] = {}
  policies: dict[str, E.Policy] = {}
  fixed_names: list[str] = []
  first, _ = load_policy(runs[0])
  conditioned = first.conditioned
  if conditioned:
    if len(runs) > 1:
      raise ValueError("eval.policies: a weight-conditioned policy is evaluated on its own (one model, all weights)")
    settings["PRO"] = _adapter_weights(ctx, examples)
    for w in simplex_grid(K, ecfg.grid_step):
      settings[_fixed_name(w)] = np.broadcast_to(w, (N, K)).astype(np.float32)
      fixed_names.append(_fixed_name(w))
    if ecfg.oracle and true_w is not None:
      settings["oracle"] = true_w
    policies = {name: first for name in settings}
  else:
    for run in runs:
      pol, meta = load_policy(run) if run != runs[0] else (first, load_checkpoint(ctx.path(run)).extra or {})
      src = str(meta.get("weights_source", "uniform"))
      if src == "adapter":
        name, w = "PRO", _adapter_weights(ctx, examples)
      elif src == "target":
        name, w = "target", target_w if target_w is not None else np.full((N, K), 1.0 / K, np.float32)
      else:
        w = resolve_example_weights(src, N, K)
        name = _fixed_name(w[0])
        fixed_names.append(name)
      if name in settings:
        raise ValueError(f"eval.policies: two runs are setting {name!r} ({run})")
      settings[name], policies[name] = w, pol
  ref = None
  if ecfg.kl:
    ref_src = load_source(ctx.source(ctx.cfg.policy.pro.reference))
    ref = (Transformer(ref_src.config.replace(value_head=False, lora=None)), {"params": ref_src.params})
  gen = E.GenerationConfig(max_prompt_len=ctx.cfg.policy.pro.max_prompt_len if conditioned else ctx.cfg.data.max_prompt_len,
                           max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size, greedy=ecfg.greedy,
                           temperature=ecfg.temperature, seed=int(ctx.cfg.seed), template=ctx.cfg.data.template)
  from tqdm import tqdm
  bar = tqdm(total=len(settings), desc="eval", unit="setting", disable=None)

  def progress(name):
    bar.set_postfix_str(name)
    bar.update(1)

  report = E.evaluate_settings(policies, settings, prompts, ctx.tokenizer, ctx.scorer, ctx.norm, uw, gen=gen,
                               reference=ref, fixed_settings=fixed_names, progress=progress)
  bar.close()
  report["utility_weights"] = uw_name
  if target_w is not None and "PRO" in settings:
    report["adapter"] = A.evaluate_adapter(settings["PRO"], target_w)
  if ctx.task_config is not None and fixed_names and conditioned:
    steps = int(round(1.0 / ecfg.grid_step))
    res = S.oracle_vs_fixed(examples, (ctx.norm.loc, ctx.norm.scale), grid_steps=steps)
    report["theorem"] = {"oracle_candidates": res["oracle"], "best_fixed_candidates": res["best_fixed"],
                         "per_prompt_best": res["theorem"]["per_prompt_best"], "gap": res["theorem"]["gap"]}
  report["seed"] = int(ctx.cfg.seed)
  E.write_report(report, ctx.path("report"), title=f"PRO evaluation (seed {int(ctx.cfg.seed)})")
  return report


def _write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def run_stage(name: str, cfg: Any, workdir: str, *, existing: str = "auto", ctx: Context | None = None) -> Any:
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
  ctx = ctx or load_context(cfg, workdir)
  if name == "eval":
    return run_eval(ctx)
  return {"sft": run_sft, "rm": run_rm, "adapter": run_adapter, "policy": run_policy}[name](ctx, existing)


def run_pipeline(cfg: Any, workdir: str, *, stages: tuple[str, ...] | None = None,
                 existing: str = "auto") -> dict[str, Any]:
  """Run the stages in order (default: all that the config enables) and return the eval report."""
  t0 = time.perf_counter()
  timings: dict[str, float] = {}
  t = time.perf_counter()
  ctx = load_context(cfg, workdir)
  say(f"data: {len(ctx.train)} train / {len(ctx.eval)} eval prompts, objectives {ctx.objectives}, "
      f"tokenizer of {len(ctx.tokenizer)} tokens")
  _lap(timings, "data", t)
  if stages is None:
    stages = tuple(s for s in STAGES if s != "rm" or "rm" in tuple(cfg.scorers))
    if cfg.sft.pro.source == "" :
      stages = tuple(s for s in stages if s != "sft")
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
    E.write_report(report, ctx.path("report"), title=f"PRO evaluation (seed {int(cfg.seed)})")
  return report
