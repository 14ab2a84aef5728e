"""The whole PRO pipeline on the embedded synthetic task (`make demo`, `pro-jax demo`).

    report = run_demo(load_config("demo"), "runs/demo")

1. data: `generate_task` (train / eval), the task's own word-level tokenizer;
2. rewards: the programmatic objectives (`SyntheticRewards`), z-score statistics over every training
   response (saved as `norm.json`);
3. `sft`: the reference policy, trained from scratch on every candidate response;
4. `adapter`: targets w*(x) = softmax(r~(x, y_w) / tau), features = the frozen reference's
   mean-pooled prompt states, KL loss; held-out KL / top-1 / Spearman against the eval targets;
5. `policy`: weight-conditioned SFT (RiC-style) from the reference: each training response y is
   conditioned on its own w*(x, y);
6. `eval`: on held-out prompts, the policy conditioned on PRO's f(x), on every fixed weight vector of
   a simplex grid, and on the hidden true weights (oracle, for reference); U = sum_k w*_k(x) r~_k
   with the true weights; report.md / report.json / front.png.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from pro_jax.data.pipeline import Pipeline, PipelineConfig
from pro_jax.data import synthetic as S
from pro_jax.models import Transformer
from pro_jax.pro import adapter as A
from pro_jax.pro import evaluate as E
from pro_jax.pro.backbone import graft, load_source
from pro_jax.pro.normalize import NormStats, fit_norm_stats
from pro_jax.pro.policy import best_of_examples, policy_loss, ric_examples
from pro_jax.pro.stage import make_task
from pro_jax.pro.weights import simplex_grid
from pro_jax.train.config import model_config_from
from pro_jax.train.trainer import train

log = logging.getLogger("pro_jax")


def _say(msg: str) -> None:
  print(f"[pro-jax demo] {msg}", flush=True)


def _pipeline(examples, tokenizer, cfg, stage_cfg, kind: str, *, name: str, extra_fields=(), seq="chosen",
              epochs=None, shuffle=True, max_prompt_len=None) -> Pipeline:
  d = cfg.data
  pc = PipelineConfig(kind=kind, batch_size=stage_cfg.batch_size, max_prompt_len=max_prompt_len or d.max_prompt_len,
                      max_response_len=d.max_response_len, bucket_multiple=d.bucket_multiple, template=d.template,
                      sequence_responses=seq, extra_fields=tuple(extra_fields), strict=True, shuffle=shuffle,
                      seed=int(cfg.seed), num_epochs=epochs, drop_remainder=epochs is None, static_shapes=True)
  return Pipeline(examples, tokenizer, pc, name=name)


def run_demo(cfg: Any, workdir: str, *, existing: str = "auto") -> dict[str, Any]:
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  seed = int(cfg.seed)
  timings: dict[str, float] = {}

  def lap(name: str, start: float) -> None:
    timings[name] = round(time.perf_counter() - start, 1)

  # 1. data ------------------------------------------------------------------------------------
  t = time.perf_counter()
  tcfg = S.SyntheticTaskConfig(seed=seed, n_train=cfg.task.n_train, n_eval=cfg.task.n_eval,
                               n_candidates=cfg.task.n_candidates, label_noise=cfg.task.label_noise,
                               humor=cfg.task.humor)
  data = S.generate_task(tcfg)
  train_ex, eval_ex = data["train"], data["eval"]
  tok_dir = S.build_tokenizer(tcfg, os.path.join(workdir, "tokenizer"))
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
  objectives = list(tcfg.objectives)
  K = len(objectives)
  _say(f"task: {len(train_ex)} train / {len(eval_ex)} eval prompts, objectives {objectives}, "
       f"vocab {len(tokenizer)}")
  lap("data", t)

  # 2. rewards and normalization -------------------------------------------------------------------
  t = time.perf_counter()
  scorer = S.SyntheticRewards(tcfg)
  prompts_all = [ex["prompt"] for ex in train_ex for _ in ex["responses"]]
  responses_all = [r for ex in train_ex for r in ex["responses"]]
  raw_all = scorer.score(prompts_all, responses_all)
  norm = fit_norm_stats(raw_all, objectives, method=cfg.norm.method)
  norm.save(os.path.join(workdir, "norm.json"))
  lap("rewards", t)

  # 3. SFT reference policy ------------------------------------------------------------------------
  t = time.perf_counter()
  model_section = cfg.model.to_dict()
  model_section["vocab_size"] = len(tokenizer)  # the task tokenizer's size (0 in the config = "from it")
  mcfg = model_config_from(model_section).replace( pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  policy_model = Transformer(mcfg)
  sft_cfg = _engine(cfg.sft, cfg, mcfg)
  sft_pipe = _pipeline(train_ex, tokenizer, cfg, cfg.sft, "sequence", name="synthetic/train", seq="responses")
  sft_task = make_task(policy_model, policy_loss("sft", policy_model), sft_pipe,
                       init=lambda rng: graft(policy_model, None, rng), name="sft",
                       extra={"tokenizer": str(tok_dir)})
  sft_dir = os.path.join(workdir, "sft")
  _say(f"stage sft: reference policy from scratch ({mcfg.num_params():,} params), {cfg.sft.total_steps} steps")
  train(sft_cfg, sft_dir, sft_task, existing=existing)
  ref = load_source(f"checkpoint:{sft_dir}")
  ref_vars = {"params": ref.params}
  lap("sft", t)

  # 4. adapter ----------------------------------------------------------------------------------
  t = time.perf_counter()
  acfg = cfg.adapter

  def targets_for(examples):
    raw = scorer.score([ex["prompt"] for ex in examples], [ex["chosen"] for ex in examples])
    return A.compute_targets(raw, norm, acfg.pro.tau)

  train_targets, eval_targets = targets_for(train_ex), targets_for(eval_ex)
  adapter_dir = os.path.join(workdir, "adapter")
  _say(f"stage adapter: MLP over the reference's prompt features, {acfg.total_steps} steps")
  pref = A.train_adapter(_engine(acfg, cfg, None), adapter_dir, train_ex, train_targets, tokenizer,
                         backbone_source=f"checkpoint:{sft_dir}", tokenizer_path=str(tok_dir), objectives=objectives,
                         hidden=acfg.pro.hidden, layers=acfg.pro.layers, max_prompt_len=cfg.data.max_prompt_len,
                         template=cfg.data.template, bucket_multiple=cfg.data.bucket_multiple, existing=existing,
                         name="synthetic/train")
  eval_prompts = [ex["prompt"] for ex in eval_ex]
  pro_w = pref(eval_prompts)
  adapter_metrics = A.evaluate_adapter(pro_w, eval_targets)
  true_w = np.asarray([S.true_weights(ex) for ex in eval_ex], np.float32)
  adapter_metrics["top1_vs_true_weights"] = float(np.mean(pro_w.argmax(1) == true_w.argmax(1)))
  _say("adapter (held out): " + ", ".join(f"{k} {v:.3f}" for k, v in adapter_metrics.items()))
  lap("adapter", t)

  # 5. weight-conditioned policy ---------------------------------------------------------------------
  t = time.perf_counter()
  pcfg = cfg.policy
  if pcfg.pro.conditioning == "own":
    resp_w = [A.compute_targets(np.asarray(ex["scores"], np.float32), norm, pcfg.pro.tau) for ex in train_ex]
    ric = ric_examples(train_ex, resp_w, objectives, pcfg.pro.decimals)
  elif pcfg.pro.conditioning == "best_of":
    z = [norm.apply(np.asarray(ex["scores"], np.float32)) for ex in train_ex]
    ric = best_of_examples(train_ex, z, objectives, pcfg.pro.samples, seed=seed, decimals=pcfg.pro.decimals,
                           concentration=pcfg.pro.concentration)
  else:
    raise ValueError(f"policy.pro.conditioning must be 'own' or 'best_of', got {pcfg.pro.conditioning!r}")
  p_pipe = _pipeline(ric, tokenizer, cfg, pcfg, "sequence", name="synthetic/train-conditioned",
                     max_prompt_len=pcfg.pro.max_prompt_len)
  p_task = make_task(policy_model, policy_loss("sft", policy_model), p_pipe,
                     init=lambda rng: graft(policy_model, ref.params, rng), name="policy",
                     extra={"tokenizer": str(tok_dir), "objectives": objectives, "conditioning": "text",
                            "decimals": pcfg.pro.decimals})
  policy_dir = os.path.join(workdir, "policy")
  _say(f"stage policy: weight-conditioned SFT (RiC-style) on {len(ric)} responses, {pcfg.total_steps} steps")
  train(_engine(pcfg, cfg, mcfg), policy_dir, p_task, existing=existing)
  pol = load_source(f"checkpoint:{policy_dir}")
  lap("policy", t)

  # 6. evaluation -------------------------------------------------------------------------------
  t = time.perf_counter()
  ecfg = cfg.eval
  N = len(eval_ex)
  settings = {"PRO": pro_w}
  grid = simplex_grid(K, ecfg.grid_step)
  fixed_names = []
  for w in grid:
    name = "fixed(" + ",".join(f"{x:.2f}" for x in w) + ")"
    settings[name] = np.broadcast_to(w, (N, K)).astype(np.float32)
    fixed_names.append(name)
  if ecfg.oracle:
    settings["oracle"] = true_w
  gen = E.GenerationConfig(max_prompt_len=pcfg.pro.max_prompt_len, max_new_tokens=ecfg.max_new_tokens,
                           batch_size=ecfg.batch_size, greedy=ecfg.greedy, seed=seed, template=cfg.data.template)
  from tqdm import tqdm
  bar = tqdm(total=len(settings), desc="eval", unit="setting", disable=None)

  def progress(name):
    bar.set_postfix_str(name)
    bar.update(1)

  policy = E.Policy("ric", policy_model, {"params": pol.params}, conditioned=True)
  report = E.evaluate_settings(policy, settings, eval_prompts, tokenizer, scorer, norm, true_w, gen=gen,
                               reference=(policy_model, ref_vars) if ecfg.kl else None, fixed_settings=fixed_names,
                               progress=progress)
  bar.close()
  lap("eval", t)
  timings["total"] = round(time.perf_counter() - t0, 1)
  report["adapter"] = adapter_metrics
  report["timings_s"] = timings
  report["seed"] = seed
  report["theorem"] = _theorem(eval_ex, norm, ecfg.grid_step)
  E.write_report(report, os.path.join(workdir, "report"), title=f"PRO demo (seed {seed})")
  _say("\n" + E.markdown_table(_top(report, 12)))
  p = report["pro"]
  _say(f"PRO U = {p['utility']:.4f} vs best fixed {p['best_fixed']} U = {p['best_fixed_utility']:.4f} "
       f"(margin {p['margin']:+.4f}); report in {os.path.join(workdir, 'report')}; {timings}")
  return report


def _engine(stage_cfg: Any, cfg: Any, mcfg: Any) -> Any:
  """The stage's engine config with the demo's seed and model section filled in."""
  import copy
  c = copy.deepcopy(stage_cfg)
  c.seed = int(cfg.seed)
  if mcfg is not None:
    for k, v in mcfg.to_dict().items():
      if k in ("lora", "rope_scaling") or k not in c.model:
        continue
      c.model[k] = v
  return c


def _theorem(eval_ex, norm: NormStats, grid_step: float) -> dict[str, float]:
  """The theorem's two sides on the eval candidates (the best candidate per weight vector, true
  weights): the ceiling prompt-aware weights can reach vs the best any fixed weight can."""
  steps = int(round(1.0 / grid_step))
  res = S.oracle_vs_fixed(eval_ex, (norm.loc, norm.scale), grid_steps=steps)
  th = res["theorem"]
  return {"oracle_candidates": res["oracle"], "best_fixed_candidates": res["best_fixed"],
          "per_prompt_best": th["per_prompt_best"], "gap": th["gap"]}


def _top(report: dict, n: int) -> dict:
  """The report with only PRO, the oracle and the n best fixed settings (for the console table)."""
  names = sorted(report["fixed_settings"], key=lambda s: -report["settings"][s]["utility"])[:n]
  keep = [s for s in ("PRO", "oracle") if s in report["settings"]] + names
  return dict(report, settings={k: report["settings"][k] for k in keep})
