"""`pro-jax` subcommands of the PRO stages: sft, rm, adapter, policy, eval, demo (pro_jax.stages.pipeline),
and `aot` (the real train step of a PRO stage, or of a plain engine config, for a TPU topology)."""

from __future__ import annotations

import argparse
import json
import sys

from pro_jax.configs import ConfigError, load_config
from pro_jax.stages.demo import run_demo
from pro_jax.stages.pipeline import run_stage
from pro_jax.stages.tasks import aot_target
from pro_jax.train.aot import AotError, aot_compile
from pro_jax.train.commands import (EXIT_FAIL, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, Command, add_config_arguments,
                                    config_from_args, existing_mode)
from pro_jax.train.trainer import NonFiniteError, Preempted, WorkdirError

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
    try:
      cfg = config_from_args(args)
      if stage == "demo":
        run_demo(cfg, args.workdir, existing=existing_mode(args))
        return EXIT_OK
      out = run_stage(stage, cfg, args.workdir, existing=existing_mode(args))
    except (ConfigError, WorkdirError, FileNotFoundError, ValueError) as e:
      print(f"pro-jax {stage}: error: {e}", file=sys.stderr)
      return EXIT_USAGE
    except Preempted as e:
      print(f"pro-jax {stage}: {e}", file=sys.stderr)
      return EXIT_PREEMPTED
    except NonFiniteError as e:
      print(f"pro-jax {stage}: stopped: {e}", file=sys.stderr)
      return EXIT_FAIL
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
  p.add_argument("--no-cost-variant", action="store_true",
                 help="skip the second, loop-free compile used for the cost-model figures when the configured "
                      "step has loops (scanned layers, micro-batches, windowed-einsum collective matmuls)")


def _aot_run(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.overrides)
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
