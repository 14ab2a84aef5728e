"""The `pro-jax` subcommand type (`Command`, exit codes), the engine's `pro-jax train`, and the
argument helpers every command uses. (`pro-jax aot`, which also compiles PRO stages, is a stage
command: `pro_jax.stages.commands`.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

from pro_jax.configs import list_configs, load_config
from pro_jax.sharding import initialize_distributed
from pro_jax.train.config import validate_config
from pro_jax.train.checkpoint import CheckpointReadError
from pro_jax.train.tasks import build_task
from pro_jax.train.trainer import NonFiniteError, Preempted, WorkdirError, train

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 75


@dataclasses.dataclass(frozen=True)
class Command:
  """A `pro-jax` subcommand: name, one-line help, `add_arguments(parser)`, `run(args) -> exit code`."""

  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace], int]
  description: str = ""
  accepts_config_overrides: bool = True  # leftover `--config.KEY=VALUE` args go to args.overrides

CONFIG_HELP = ("config: a name from pro_jax/configs ({names}) or a path to a .py file defining get_config(); "
               "NAME:ARG passes ARG to get_config")


def add_config_arguments(parser: argparse.ArgumentParser, workdir: bool = True) -> None:
  """--config (+ free --config.KEY=VALUE overrides) and, for training commands, --workdir/--resume/--overwrite."""
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
  cfg = load_config(args.config, getattr(args, "overrides", []))
  d = cfg.distributed
  initialize_distributed(d.initialize, d.coordinator_address or None,
                         d.num_processes if d.num_processes > 0 else None,
                         d.process_id if d.process_id >= 0 else None)
  return cfg


def run_error_exit(command: str, error: BaseException) -> int | None:
  """Print the one-line message and return the exit code of an error a training run ends with
  (preempted 75; a workdir holding another run 2; non-finite values / too many skipped steps or an
  unreadable checkpoint 1); None for any other error. Shared by `pro-jax train` and the PRO stages."""
  endings = ((Preempted, "", EXIT_PREEMPTED), (WorkdirError, "error: ", EXIT_USAGE),
             (NonFiniteError, "stopped: ", EXIT_FAIL), (CheckpointReadError, "error: ", EXIT_FAIL))
  for kind, label, code in endings:
    if isinstance(error, kind):
      print(f"pro-jax {command}: {label}{error}", file=sys.stderr)
      return code
  return None


def existing_mode(args: argparse.Namespace) -> str:
  return "overwrite" if getattr(args, "overwrite", False) else "resume" if getattr(args, "resume", False) else "auto"


# ---------------------------------------------------------------------------------------------
# train


def _train_args(p: argparse.ArgumentParser) -> None:
  add_config_arguments(p)


def _train_run(args: argparse.Namespace) -> int:
  cfg = config_from_args(args)
  validate_config(cfg)
  task = build_task(cfg)
  try:
    result = train(cfg, args.workdir, task, existing=existing_mode(args))
  except Exception as e:  # noqa: BLE001 - the run's known endings get their exit code, the rest propagates
    code = run_error_exit("train", e)
    if code is None:
      raise
    return code
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
