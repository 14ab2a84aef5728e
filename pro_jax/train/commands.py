"""The engine's subcommands, `pro-jax train` and `pro-jax aot`, and argument helpers for stages."""

from __future__ import annotations

import argparse
import json
import sys

from pro_jax.cli import EXIT_FAIL, EXIT_OK, EXIT_PREEMPTED, Command

CONFIG_HELP = ("config: a name from pro_jax/configs ({names}) or a path to a .py file defining get_config(); "
               "NAME:ARG passes ARG to get_config")


def add_config_arguments(parser: argparse.ArgumentParser, workdir: bool = True) -> None:
  """--config (+ free --config.KEY=VALUE overrides) and, for training commands, --workdir/--resume/--overwrite."""
  from pro_jax.configs import list_configs
  parser.add_argument("--config", required=True, help=CONFIG_HELP.format(names=", ".join(list_configs())))
  if workdir:
    parser.add_argument("--workdir", required=True,
                        help="run directory: config.json, checkpoints/, metrics.jsonl, tb/ (local or gs://)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir even if its config differs (the new config is recorded)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run in --workdir (checkpoints, config, logs) and start afresh")
  parser.epilog = ("config overrides: --config.SECTION.KEY=VALUE, e.g. --config.optim.lr=1e-5 "
                   "--config.mesh.fsdp=4 (unknown keys and wrongly typed values are errors)")


def config_from_args(args: argparse.Namespace):
  """Load --config with the overrides, initialize multi-host JAX if configured, validate (no compile)."""
  from pro_jax.configs import load_config
  from pro_jax.sharding import initialize_distributed
  cfg = load_config(args.config, getattr(args, "overrides", []))
  d = cfg.distributed
  initialize_distributed(d.initialize, d.coordinator_address or None,
                         d.num_processes if d.num_processes > 0 else None,
                         d.process_id if d.process_id >= 0 else None)
  return cfg


def existing_mode(args: argparse.Namespace) -> str:
  return "overwrite" if getattr(args, "overwrite", False) else "resume" if getattr(args, "resume", False) else "auto"


# ---------------------------------------------------------------------------------------------
# train


def _train_args(p: argparse.ArgumentParser) -> None:
  add_config_arguments(p)


def _train_run(args: argparse.Namespace) -> int:
  from pro_jax.train.config import validate_config
  from pro_jax.train.tasks import build_task
  from pro_jax.train.trainer import NonFiniteError, WorkdirError, train
  cfg = config_from_args(args)
  validate_config(cfg)
  task = build_task(cfg)
  try:
    result = train(cfg, args.workdir, task, existing=existing_mode(args))
  except WorkdirError as e:
    print(f"pro-jax train: error: {e}", file=sys.stderr)
    return 2
  except NonFiniteError as e:
    print(f"pro-jax train: stopped: {e}", file=sys.stderr)
    return EXIT_FAIL
  m = {k: float(v) for k, v in result.last_metrics.items() if k in ("loss", "accuracy", "grad_norm")}
  print(json.dumps({"status": result.status, "step": result.step, **m}))
  if result.status == "preempted":
    print(f"pro-jax train: preempted at step {result.step}; checkpoint saved; rerun to resume", file=sys.stderr)
    return EXIT_PREEMPTED
  return EXIT_OK


TRAIN = Command(
    name="train", help="train with the generic language-model loss (or the engine's toy DPO) on a config's data",
    description=(
        "Train the config's model with the engine: loss.name='lm' (next-token loss on data.kind="
        "'synthetic' or 'tokens' with data.path a .npy / uint16 .bin token file) or 'dpo' (the engine's toy "
        "sigmoid DPO against a frozen copy of the initial policy, on synthetic pairs).\n"
        "Resumes automatically from the newest checkpoint in --workdir when its config matches; "
        "SIGTERM saves a checkpoint and exits with code 75.\n"
        "Multi-host (TPU pod slice): run the same command on every host; distributed.initialize='auto' "
        "calls jax.distributed.initialize()."),
    add_arguments=_train_args, run=_train_run)


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
  from pro_jax.configs import load_config
  from pro_jax.stages.tasks import aot_target
  from pro_jax.train.aot import AotError, aot_compile
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
