"""`pro-jax` subcommands of the PRO stages: sft, rm, adapter, policy, eval, demo (pro_jax.stages.pipeline)."""

from __future__ import annotations

import argparse
import json
import sys

from pro_jax.cli import EXIT_FAIL, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, Command
from pro_jax.train.commands import add_config_arguments, config_from_args, existing_mode

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
    from pro_jax.configs import ConfigError
    from pro_jax.stages.pipeline import Preempted, run_pipeline, run_stage
    from pro_jax.train.trainer import NonFiniteError, WorkdirError
    try:
      cfg = config_from_args(args)
      if stage == "demo":
        from pro_jax.stages.demo import run_demo
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
