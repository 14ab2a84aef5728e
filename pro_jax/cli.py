"""The `pro-jax` command line: one subcommand per stage of PRO, plus the engine's `train` and `aot`.

    pro-jax train --config tiny_lm --workdir /tmp/run --config.optim.lr=1e-3
    pro-jax aot --config llama2_7b_dpo --topology v5e:4x4
    pro-jax <command> --help

A subcommand is a `Command` (`pro_jax.train.commands`: name, one-line help, `add_arguments(parser)`, `run(args) -> exit code`).
Stages register theirs by adding `"name": "module.path:ATTRIBUTE"` to `COMMANDS` below (imported when
the parser is built), or at run time with `register_command`.

Exit codes: 0 done; 1 failure; 2 bad usage or config (reported before anything is compiled or
written); 75 preempted (SIGTERM: a checkpoint was saved; run the same command again to resume).

Errors: pro-jax's own errors (exception classes defined in pro_jax, e.g. ConfigError, CheckpointError,
DataError, HubError, and ValueError / FileNotFoundError raised by pro_jax's own code when it checks
its input) are printed as one line, `pro-jax CMD: error: ...`, exit code 2; `--debug` adds their
traceback. Anything else (a bug, an error inside jax or another library) propagates with its full
traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pathlib
import sys
import traceback
from collections.abc import Sequence

import pro_jax

from pro_jax.configs import ConfigError  # noqa: F401 - re-exported
from pro_jax.train.commands import EXIT_FAIL, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, Command  # noqa: F401


# name -> "module:attribute" of a Command. Later stages add theirs here.
COMMANDS: dict[str, str] = {
    "demo": "pro_jax.stages.commands:DEMO",
    "sft": "pro_jax.stages.commands:SFT",
    "rm": "pro_jax.stages.commands:RM",
    "adapter": "pro_jax.stages.commands:ADAPTER",
    "policy": "pro_jax.stages.commands:POLICY",
    "eval": "pro_jax.stages.commands:EVAL",
    "train": "pro_jax.train.commands:TRAIN",
    "aot": "pro_jax.stages.commands:AOT",
    "generate": "pro_jax.stages.commands:GENERATE",
    "export": "pro_jax.stages.commands:EXPORT",
}
_extra: dict[str, Command] = {}


def register_command(command: Command) -> None:
  """Add a subcommand at run time (e.g. from a plugin) before `main()` builds the parser."""
  _extra[command.name] = command


def _load(target: str) -> Command:
  module, _, attr = target.partition(":")
  return getattr(importlib.import_module(module), attr)


def commands() -> dict[str, Command]:
  out = {name: _load(target) for name, target in COMMANDS.items()}
  out.update(_extra)
  return out


def build_parser(cmds: dict[str, Command] | None = None) -> argparse.ArgumentParser:
  cmds = commands() if cmds is None else cmds
  parser = argparse.ArgumentParser(
      prog="pro-jax",
      description="PRO (prompt-aware multi-objective alignment) in JAX: one subcommand per stage. "
                  "Config overrides: --config.SECTION.KEY=VALUE (checked against the config).",
      epilog="exit codes: 0 done, 1 failure, 2 bad usage/config, 75 preempted (checkpoint saved; rerun to resume)")
  parser.add_argument("--version", action="version", version=f"pro-jax {pro_jax.__version__}")
  parser.add_argument("--debug", action="store_true", help="show the traceback of pro-jax's own errors too")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for name, cmd in cmds.items():
    p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of pro-jax's own errors too")
    cmd.add_arguments(p)
  return parser


_PACKAGE_DIR = pathlib.Path(pro_jax.__file__).resolve().parent


def is_own_error(error: BaseException) -> bool:
  """An error pro-jax reports as bad input (exit 2): an exception class defined in pro_jax, or a plain
  ValueError / FileNotFoundError raised by pro_jax's own code (the innermost frame is in the package)."""
  if type(error).__module__.split(".")[0] == "pro_jax":
    return True
  if type(error) not in (ValueError, FileNotFoundError):
    return False
  tb = error.__traceback__
  last = None
  while tb is not None:
    last, tb = tb, tb.tb_next
  if last is None:
    return False
  return pathlib.Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src.xla_bridge", "orbax", "jax._src.distributed"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  cmds = commands()
  parser = build_parser(cmds)
  args, rest = parser.parse_known_args(argv)
  cmd = cmds[args.command]
  if rest and not cmd.accepts_config_overrides:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  args.overrides = rest
  try:
    return int(cmd.run(args) or 0)
  except Exception as e:  # noqa: BLE001 - classified below; anything not ours propagates with its traceback
    if not is_own_error(e):
      raise
    if getattr(args, "debug", False):
      traceback.print_exc()
    print(f"pro-jax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
