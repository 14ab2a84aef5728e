"""`pro-jax` subcommands of the PRO stages: sft, rm, adapter, policy, eval, demo (pro_jax.stages.pipeline),
and `aot` (the real train step of a PRO stage, or of a plain engine config, for a TPU topology)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pro_jax.configs import ConfigError, load_config
from pro_jax.stages.demo import run_demo
from pro_jax.stages.export import export_run
from pro_jax.stages.pipeline import run_stage
from pro_jax.stages.tasks import aot_target, decode_target
from pro_jax.stages.use import load_pro
from pro_jax.train.aot import AotError, aot_compile
from pro_jax.train.aot_decode import aot_decode
from pro_jax.train.commands import (EXIT_FAIL, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, Command, add_config_arguments,  # noqa: F401
                                    config_from_args, existing_mode, run_error_exit)

HELP = {
    "sft": "stage 0: the reference policy (SFT on the data's responses; skip it if you bring one)",
    "rm": "stage 1: train the multi-head reward model (Bradley-Terry per objective, masked); held-out accuracy",
    "adapter": "stages 2-4: normalization, targets w* = softmax(r~(x, y_w)/tau) and the preference adapter",
    "policy": "stage 5: the policy with prompt-aware weights (sft, ric, dpo, wdpo, modpo or ppo; weights_source)",
    "eval": "evaluation: PRO's weights vs a grid of fixed weights; report.md / report.json / front.png",
    "demo": "the whole pipeline on the embedded synthetic task (the README's `make demo`), < 10 min on a CPU",
}


PIPELINE_HELP = """\
The PRO pipeline: one config, five stages, one workdir W (see docs/stages.md):
  pro-jax sft     --config CFG --workdir W   reference policy                -> W/sft
  pro-jax rm      --config CFG --workdir W   multi-head reward model         -> W/rm
  pro-jax adapter --config CFG --workdir W   targets + preference adapter    -> W/adapter, W/norm.json
  pro-jax policy  --config CFG --workdir W   policy with prompt-aware weights -> W/policy
  pro-jax eval    --config CFG --workdir W   PRO vs fixed weights            -> W/report
Each training stage resumes from its last checkpoint when rerun (exit code 75 = preempted, rerun)."""


def _args(stage: str):
  def add(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    if stage == "demo":
      for a in p._actions:
        if a.dest == "config":
          a.required, a.default = False, "demo"
        if a.dest == "workdir":
          a.required, a.default = False, "runs/demo"
    p.epilog = (p.epilog or "") + "\nstages read and write the same --workdir: W/sft, W/rm, W/adapter, W/policy, W/report"
  return add


def _run(stage: str):
  def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:  # run_stage / run_pipeline check the config, sources and data before they write anything
      if stage == "demo":
        run_demo(cfg, args.workdir, existing=existing_mode(args))
        return EXIT_OK
      out = run_stage(stage, cfg, args.workdir, existing=existing_mode(args))
    except Exception as e:  # noqa: BLE001 - the run's known endings get their exit code, the rest propagates
      code = run_error_exit(stage, e)
      if code is None:
        raise
      return code
    if isinstance(out, dict) and stage != "eval":
      print(json.dumps(out, default=float))
    if stage == "eval" and out.get("pro"):
      p = out["pro"]
      print(json.dumps({"pro_utility": p["utility"], "best_fixed": p["best_fixed"],
                        "best_fixed_utility": p["best_fixed_utility"], "margin": p["margin"]}))
    return EXIT_OK
  return run


def _command(stage: str) -> Command:
  return Command(name=stage, help=HELP[stage], add_arguments=_args(stage), run=_run(stage),
                 description=HELP[stage] + "\n\n" + PIPELINE_HELP)


SFT, RM, ADAPTER, POLICY, EVAL, DEMO = (_command(s) for s in ("sft", "rm", "adapter", "policy", "eval", "demo"))


# ---------------------------------------------------------------------------------------------
# aot


def _aot_args(p: argparse.ArgumentParser) -> None:
  add_config_arguments(p, workdir=False)
  p.add_argument("--topology", required=True,
                 help="TPU topology, e.g. v5e:4x4, v5e:2x2, v5p:2x2x2, v4:2x2x2, v6e:4x4")
  p.add_argument("--stage", default="", choices=["", "sft", "rm", "adapter", "policy"],
                 help="PRO pipeline configs: the stage whose train step to compile (default: the config's "
                      "`stage` field, else policy); see pro_jax/stages/tasks.py")
  p.add_argument("--json", default="", help="also write the report as JSON to this file")
  p.add_argument("--decode", action="store_true",
                 help="compile the policy's rollout decode step (one token per row, KV cache) instead of a train "
                      "step; report HBM-bandwidth figures (PRO pipeline configs)")
  p.add_argument("--decode-batch", type=int, default=0,
                 help="rows per decode step (default: ppo.rollout_batch, else eval.batch_size)")
  p.add_argument("--decode-len", type=int, default=0,
                 help="KV-cache slots (default: the padded prompt length + max_new_tokens)")
  p.add_argument("--no-cost-variant", action="store_true",
                 help="skip the second, loop-free compile used for the cost-model figures when the configured "
                      "step has loops (scanned layers, micro-batches, windowed-einsum collective matmuls)")


def _aot_decode_run(cfg: Any, args: argparse.Namespace) -> int:
  t = decode_target(cfg, args.decode_batch, args.decode_len)
  try:
    report = aot_decode(t.model, args.topology, t.mesh, batch=t.batch, cache_len=t.cache_len, rules=t.rules)
  except AotError as e:
    print(f"pro-jax aot: error: {e}", file=sys.stderr)
    return EXIT_FAIL
  print(f"policy decode step: {t.model.num_params():,} params, {t.model.dtype} compute / {t.model.param_dtype} "
        f"variables" + (f", LoRA r={t.model.lora.rank} unmerged" if t.model.lora is not None else ""))
  print(report.table())
  if args.json:
    with open(args.json, "w") as f:
      f.write(report.to_json() + "\n")
  return EXIT_OK if report.total_bytes <= report.hbm_bytes else EXIT_FAIL


def _aot_run(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.overrides)
  if args.decode:
    return _aot_decode_run(cfg, args)
  target = aot_target(cfg, args.stage or None)  # a PRO pipeline config: the stage's engine config and Task
  try:
    report = aot_compile(target.engine_config, args.topology, target.task_fn, cost_variant=not args.no_cost_variant)
  except AotError as e:
    print(f"pro-jax aot: error: {e}", file=sys.stderr)
    return EXIT_FAIL
  if target.description:
    print(target.description)
  print(report.table())
  if args.json:
    with open(args.json, "w") as f:
      f.write(report.to_json() + "\n")
  if not report.fits:
    print(f"pro-jax aot: the step needs {report.total_bytes / 2**30:.2f} GiB per device, more than the "
          f"{report.hbm_bytes / 2**30:.0f} GiB of HBM of {args.topology}", file=sys.stderr)
    return EXIT_FAIL
  return EXIT_OK


AOT = Command(
    name="aot", help="compile the real train step for a TPU topology on this host; report HBM, cost-model time, MFU",
    description=(
        "Ahead-of-time compile the config's train step for a Cloud TPU topology from abstract shapes (no TPU, "
        "no weights; needs jax[tpu] installed for libtpu's compiler). Prints per-chip HBM use (arguments, "
        "outputs, temporaries vs the chip's HBM), XLA's cost-model time (optimal_seconds), model FLOPs per "
        "step and the MFU they imply. Exits 1 when the step does not fit in HBM."),
    add_arguments=_aot_args, run=_aot_run)


# ---------------------------------------------------------------------------------------------
# generate / export: using a trained run


def _generate_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="the PRO workdir (local or gs://), or a policy run inside it")
  p.add_argument("--policy", default=None, help="the policy run's name inside the workdir (default: policy)")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts-file", default=None,
                 help="prompts, one per line ('-' = stdin); without --prompt or this, a piped stdin is read")
  p.add_argument("--weights", default=None,
                 help="explicit objective weights for every prompt, comma-separated in the run's objective order "
                      "(default: the preference adapter's weights per prompt)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--sample", action="store_true", help="sample (temperature / top-k / top-p) instead of greedy")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text")


def _read_prompts(args: argparse.Namespace) -> list[str]:
  prompts = list(args.prompt)
  source = args.prompts_file
  if source is None and not prompts and not sys.stdin.isatty():
    source = "-"
  if source is not None:
    if source == "-":
      text = sys.stdin.read()
    else:
      try:
        with open(source) as f:
          text = f.read()
      except OSError as e:
        raise ConfigError(f"--prompts-file {source}: {e.strerror}") from e
    prompts += [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise ConfigError("no prompts: pass --prompt TEXT, --prompts-file FILE, or pipe prompts (one per line) to stdin")
  return prompts


def _parse_weights(text: str | None, objectives: tuple[str, ...]) -> list[float] | None:
  if text is None:
    return None
  try:
    w = [float(x) for x in text.replace(" ", "").split(",") if x]
  except ValueError as e:
    raise ConfigError(f"--weights {text!r}: expected numbers separated by commas ({e})") from e
  if len(w) != len(objectives):
    raise ConfigError(f"--weights {text!r}: {len(w)} numbers for {len(objectives)} objectives {list(objectives)}")
  return w


def _generate_run(args: argparse.Namespace) -> int:
  prompts = _read_prompts(args)
  run = load_pro(args.workdir, policy=args.policy, with_reward_model=False)
  weights = _parse_weights(args.weights, run.objectives)
  texts, used = run.generate(prompts, weights, max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             return_weights=True)
  source = "explicit" if weights is not None else ("adapter" if used is not None else "none: the policy takes none")
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    w = None if used is None else [round(float(x), 4) for x in used[i]]
    if args.json:
      print(json.dumps({"prompt": prompt, "objectives": list(run.objectives), "weights": w,
                        "weights_source": source.split(":")[0], "response": text}))
    else:
      shown = "-" if w is None else "  ".join(f"{o}={x:.3f}" for o, x in zip(run.objectives, w))
      print(f"prompt:   {prompt}\nweights:  {shown}  ({source})\nresponse: {text}\n")
  return EXIT_OK


GENERATE = Command(
    name="generate", help="generate with a trained PRO policy: the adapter's (or given) weights and the response",
    description=(
        "Load a trained PRO run (pro_jax.load_pro) and answer prompts with its policy, conditioned as in training "
        "on the preference adapter's weights for each prompt, or on --weights. Prints the weights and the response."),
    add_arguments=_generate_args, run=_generate_run, accepts_config_overrides=False)


def _export_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="the policy run to export (e.g. W/policy)")
  p.add_argument("--out", required=True, help="output directory")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--merged", dest="mode", action="store_const", const="merged",
                    help="a transformers model with any LoRA folded in (default)")
  mode.add_argument("--peft", dest="mode", action="store_const", const="peft",
                    help="a PEFT LoRA adapter (LoRA runs only)")
  p.set_defaults(mode="merged")
  p.add_argument("--base-model", default=None,
                 help="--peft: the adapter's base (Hub id or directory); default the run's hf: init source, else "
                      "the run's base weights written to OUT/base")
  p.add_argument("--tokenizer", default=None, help="default: the tokenizer the run recorded")
  p.add_argument("--dtype", default=None, help="tensor dtype in the files, e.g. bfloat16 (default: as trained)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                 help="upload the export to this Hub repository (token: HF_TOKEN or `hf auth login`)")


def _export_run(args: argparse.Namespace) -> int:
  out = export_run(args.workdir, args.out, mode=args.mode, base_model=args.base_model, tokenizer=args.tokenizer,
                   dtype=args.dtype, overwrite=args.overwrite, push_to=args.push_to_hub)
  print(json.dumps({"out": str(out), "mode": args.mode, "files": sorted(p.name for p in out.iterdir()),
                    "pushed_to": args.push_to_hub}))
  return EXIT_OK


EXPORT = Command(
    name="export", help="export a policy: a merged transformers model or a PEFT adapter (+ tokenizer, model card)",
    description=(
        "pro-jax export --workdir W/policy --out DIR [--merged | --peft] [--push-to-hub ORG/NAME]\n"
        "Writes the policy as a transformers model (LoRA merged) or as a PEFT LoRA adapter, its tokenizer and a "
        "README.md model card (objectives, normalization, how to condition); optionally pushes it to the Hub."),
    add_arguments=_export_args, run=_export_run, accepts_config_overrides=False)
