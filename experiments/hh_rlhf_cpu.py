"""PRO stages 1-4 on REAL HH-RLHF data, CPU-sized (minutes on 2 cores).

Data: the Anthropic HH-RLHF test files of helpful-base and harmless-base (the only HH files in
shared/data), each split deterministically into train / held-out rows.

1. Reward model (stage 1): ONE reward model with K = 2 heads ("helpful", "harmless") trained with
   the masked Bradley-Terry loss: helpful-base pairs speak only for "helpful" (pair_objectives
   [1, 0]), harmless-base pairs only for "harmless" ([0, 1]). Held-out per-objective pair accuracy.
2. Normalization (stage 2): z-score statistics of both heads over the training responses (chosen
   and rejected of the scored training rows).
3. Targets (stage 3): w*(x) = softmax(r~(x, y_w) / tau) for every training prompt.
4. Adapter (stage 4): f(x) = softmax(MLP(mean-pooled frozen prompt features)) trained with
   KL(w* || f); on HELD-OUT prompts we compare the mean adapter weights of helpful-base and
   harmless-base prompts. The adapter never sees which file a prompt came from.

    python experiments/hh_rlhf_cpu.py --workdir runs/hh_cpu [--data-dir ../shared/data]

See docs/reward_models.md for the choices and the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np

OBJECTIVES = ("helpful", "harmless")
FILES = {"helpful": "hh_rlhf/helpful-base", "harmless": "hh_rlhf/harmless-base"}


@dataclasses.dataclass
class HHConfig:
  """Sizes and choices (defaults: the CPU test's setting)."""

  seed: int = 0
  held_out_fraction: float = 0.2
  rows_per_file: int = 0  # 0 = every kept row of each file
  # reward model: a tiny Llama trained from scratch on the stories260K SentencePiece tokenizer
  rm_backbone: str = "scratch"  # "scratch" | "stories260k" (the pretrained llama2.c model)
  rm_d_model: int = 32
  rm_layers: int = 1
  rm_heads: int = 2
  rm_mlp: int = 64
  rm_prompt_len: int = 32  # the end of the dialogue (cut from the left)
  rm_response_len: int = 96  # responses cut (as text) to this many tokens with EOS
  rm_steps: int = 300
  rm_batch: int = 32
  rm_lr: float = 3e-3
  # normalization / targets
  norm: str = "zscore"
  tau: float = 1.0
  score_rows_per_file: int = 0  # training rows per file scored for stats + targets (0 = all)
  # adapter
  adapter_backbone: str = "stories260k"  # "stories260k" (pretrained llama2.c) | "rm" (the RM's trunk)
  adapter_prompt_len: int = 128
  adapter_steps: int = 300
  adapter_batch: int = 32
  adapter_lr: float = 1e-2
  adapter_hidden: int = 256
  adapter_layers: int = 2


def _say(msg: str) -> None:
  print(f"[hh-cpu] {msg}", flush=True)


def split_rows(examples: list[dict], fraction: float, seed: int, limit: int = 0) -> tuple[list[dict], list[dict]]:
  """Deterministic (seeded permutation) train / held-out split of one file's rows."""
  order = np.random.default_rng(seed).permutation(len(examples))
  if limit:
    order = order[:limit]
  n_held = int(round(len(order) * fraction))
  held = sorted(order[:n_held].tolist())
  train = sorted(order[n_held:].tolist())
  return [examples[i] for i in train], [examples[i] for i in held]


def _stage_cfg(steps: int, batch: int, lr: float, seed: int):
  from pro_jax.stages.stage import engine_config
  return engine_config(**{"seed": seed, "total_steps": steps, "batch_size": batch, "optim.lr": lr,
                          "optim.warmup_steps": min(20, steps), "optim.weight_decay": 0.0,
                          "checkpoint.every_steps": steps, "checkpoint.keep": 1, "log.every_steps": 50,
                          "log.progress": False, "log.tensorboard": False})


def run(workdir: str, data_dir: str, config: HHConfig | None = None, *, existing: str = "auto") -> dict[str, Any]:
  """Run the experiment; returns (and writes WORKDIR/report.json) the figures."""
  from pro_jax.data import sources
  from pro_jax.models import ModelConfig
  from pro_jax.models.llama2c import load_llama2c
  from pro_jax.stages import adapter
  from pro_jax.stages import rm
  from pro_jax.pro.normalize import fit_norm_stats

  c = config or HHConfig()
  t0 = time.perf_counter()
  timings: dict[str, float] = {}
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  data_dir = pathlib.Path(data_dir).expanduser()
  stories = data_dir / "models" / "stories260K" / "stories260K.bin"

  # data --------------------------------------------------------------------------------------
  t = time.perf_counter()
  _, _, tok = load_llama2c(stories)  # the 512-token SentencePiece tokenizer (byte fallback)
  train, held = {}, {}
  for obj, name in FILES.items():
    ex = sources.load_examples(name, "test", manual_dir=str(data_dir / "hh_rlhf"), mode="lenient")
    tr, he = split_rows(list(ex), c.held_out_fraction, c.seed, c.rows_per_file)
    train[obj], held[obj] = tr, he
  rm_train, n_cut = rm.fit_responses(train["helpful"] + train["harmless"], tok, c.rm_response_len, template="plain")
  rm_held, _ = rm.fit_responses(held["helpful"] + held["harmless"], tok, c.rm_response_len, template="plain")
  _say(f"data: train {len(train['helpful'])} helpful-base + {len(train['harmless'])} harmless-base pairs, held out "
       f"{len(held['helpful'])} + {len(held['harmless'])}; {n_cut} training responses cut to {c.rm_response_len} tokens")
  timings["data"] = time.perf_counter() - t

  # 1. reward model ----------------------------------------------------------------------------
  t = time.perf_counter()
  rm_dir = os.path.join(workdir, "rm")
  rm_cfg = _stage_cfg(c.rm_steps, c.rm_batch, c.rm_lr, c.seed)
  if c.rm_backbone == "scratch":
    source = "scratch"
    mcfg = ModelConfig(vocab_size=len(tok), d_model=c.rm_d_model, n_layers=c.rm_layers, n_heads=c.rm_heads,
                       mlp_dim=c.rm_mlp, max_seq_len=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  elif c.rm_backbone == "stories260k":
    source, mcfg = f"llama2c:{stories}", None
  else:
    raise ValueError(f"rm_backbone must be 'scratch' or 'stories260k', got {c.rm_backbone!r}")
  model, variables = rm.train_reward_model(rm_cfg, rm_dir, rm_train, tok, backbone_source=source, objectives=OBJECTIVES,
                                           model_config=mcfg, max_prompt_len=c.rm_prompt_len,
                                           max_response_len=c.rm_response_len, template="plain", existing=existing,
                                           name="hh_rlhf/train")
  rm_eval = rm.evaluate_reward_model(model, variables, rm_held, tok, objectives=OBJECTIVES,
                                     max_prompt_len=c.rm_prompt_len, max_response_len=c.rm_response_len,
                                     template="plain", name="hh_rlhf/held-out")
  rm_train_eval = rm.evaluate_reward_model(model, variables, rm_train, tok, objectives=OBJECTIVES,
                                           max_prompt_len=c.rm_prompt_len, max_response_len=c.rm_response_len,
                                           template="plain", name="hh_rlhf/train")
  _say(f"reward model ({model.config.num_params():,} params, {c.rm_steps} steps): held-out accuracy "
       + ", ".join(f"{k} {v:.3f}" for k, v in rm_eval["accuracy"].items())
       + f" (train {', '.join(f'{k} {v:.3f}' for k, v in rm_train_eval['accuracy'].items())})")
  timings["reward_model"] = time.perf_counter() - t

  # 2. normalization, 3. targets -----------------------------------------------------------------
  t = time.perf_counter()
  scorer = rm.load_reward_model(rm_dir, batch_size=128)

  def subsample(rows):
    if not c.score_rows_per_file or len(rows) <= c.score_rows_per_file:
      return rows
    idx = np.random.default_rng(c.seed + 1).permutation(len(rows))[:c.score_rows_per_file]
    return [rows[i] for i in sorted(idx)]

  scored = {obj: subsample(train[obj]) for obj in OBJECTIVES}
  raw_chosen, raw_rejected = {}, {}
  for obj in OBJECTIVES:
    prompts = [ex["prompt"] for ex in scored[obj]]
    raw_chosen[obj] = scorer.score(prompts, [ex["chosen"] for ex in scored[obj]])
    raw_rejected[obj] = scorer.score(prompts, [ex["rejected"] for ex in scored[obj]])
  all_raw = np.concatenate([raw_chosen[o] for o in OBJECTIVES] + [raw_rejected[o] for o in OBJECTIVES])
  norm = fit_norm_stats(all_raw, OBJECTIVES, method=c.norm)
  norm.save(os.path.join(workdir, "norm.json"))
  adapter_rows = scored["helpful"] + scored["harmless"]
  targets = adapter.compute_targets(np.concatenate([raw_chosen[o] for o in OBJECTIVES]), norm, c.tau)
  n_help = len(scored["helpful"])
  target_means = {"helpful-base": targets[:n_help].mean(0).tolist(), "harmless-base": targets[n_help:].mean(0).tolist()}
  held_targets = {}
  for obj in OBJECTIVES:
    raw = scorer.score([ex["prompt"] for ex in held[obj]], [ex["chosen"] for ex in held[obj]])
    held_targets[obj] = adapter.compute_targets(raw, norm, c.tau)
  _say(f"norm ({c.norm}) over {len(all_raw)} training responses: loc {np.round(norm.loc, 3).tolist()}, "
       f"scale {np.round(norm.scale, 3).tolist()}; mean w* (train) helpful-base {np.round(target_means['helpful-base'], 3).tolist()}"
       f", harmless-base {np.round(target_means['harmless-base'], 3).tolist()}")
  timings["targets"] = time.perf_counter() - t

  # 4. adapter ------------------------------------------------------------------------------------
  t = time.perf_counter()
  if c.adapter_backbone == "rm":
    a_source, a_tok_path = f"checkpoint:{rm_dir}", os.path.join(rm_dir, rm.TOKENIZER_DIR)
  elif c.adapter_backbone == "stories260k":
    a_source, a_tok_path = f"llama2c:{stories}", "builtin"
  else:
    raise ValueError(f"adapter_backbone must be 'rm' or 'stories260k', got {c.adapter_backbone!r}")
  a_cfg = _stage_cfg(c.adapter_steps, c.adapter_batch, c.adapter_lr, c.seed)
  pref = adapter.train_adapter(a_cfg, os.path.join(workdir, "adapter"), adapter_rows, targets, tok,
                               backbone_source=a_source, tokenizer_path=a_tok_path, objectives=OBJECTIVES, hidden=c.adapter_hidden,
                               layers=c.adapter_layers, max_prompt_len=c.adapter_prompt_len, template="plain",
                               existing=existing, name="hh_rlhf/train-prompts")
  weights = {obj: pref([ex["prompt"] for ex in held[obj]]) for obj in OBJECTIVES}
  all_w = np.concatenate([weights[o] for o in OBJECTIVES])
  all_t = np.concatenate([held_targets[o] for o in OBJECTIVES])
  adapter_metrics = adapter.evaluate_adapter(all_w, all_t)
  timings["adapter"] = time.perf_counter() - t

  mean_w = {f"{FILES[o].split('/')[1]}": dict(zip(OBJECTIVES, weights[o].mean(0).tolist())) for o in OBJECTIVES}
  mean_t = {f"{FILES[o].split('/')[1]}": dict(zip(OBJECTIVES, held_targets[o].mean(0).tolist())) for o in OBJECTIVES}
  # how well the adapter's helpful weight separates the two files' held-out prompts (AUC; diagnosis only)
  auc = _auc(weights["helpful"][:, 0], weights["harmless"][:, 0])
  timings["total"] = time.perf_counter() - t0
  report = {
      "config": dataclasses.asdict(c),
      "rows": {o: {"train": len(train[o]), "held_out": len(held[o]), "scored": len(scored[o])} for o in OBJECTIVES},
      "rm_params": model.config.num_params(),
      "rm_held_out": rm_eval, "rm_train": rm_train_eval,
      "norm": norm.to_dict(),
      "mean_target_train": target_means, "mean_target_held_out": mean_t,
      "mean_adapter_weight_held_out": mean_w,
      "adapter_held_out": adapter_metrics, "adapter_split_auc": auc,
      "timings_s": {k: round(v, 1) for k, v in timings.items()},
  }
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  _say("held-out mean adapter weights: " + "; ".join(
      f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in w.items()) for split, w in mean_w.items()))
  _say("held-out mean targets w*:       " + "; ".join(
      f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in w.items()) for split, w in mean_t.items()))
  _say(f"adapter vs held-out targets: {', '.join(f'{k} {v:.3f}' for k, v in adapter_metrics.items())}; "
       f"split AUC of the helpful weight {auc:.3f}; timings {report['timings_s']}")
  return report


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
  """P(a positive scores above a negative), ties count half."""
  allv = np.concatenate([pos, neg])
  order = allv.argsort(kind="mergesort")
  ranks = np.empty(len(allv))
  ranks[order] = np.arange(1, len(allv) + 1)
  for v in np.unique(allv):  # average ranks of ties
    m = allv == v
    if m.sum() > 1:
      ranks[m] = ranks[m].mean()
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  repo = pathlib.Path(__file__).resolve().parents[1]
  p.add_argument("--data-dir", default=os.environ.get("PRO_JAX_SHARED_DATA", str(repo.parent / "shared" / "data")))
  p.add_argument("--existing", default="auto", choices=("auto", "resume", "overwrite"))
  for f in dataclasses.fields(HHConfig):
    p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
  args = p.parse_args(argv)
  cfg = HHConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(HHConfig)})
  return run(args.workdir, args.data_dir, cfg, existing=args.existing)


if __name__ == "__main__":
  main(sys.argv[1:])
