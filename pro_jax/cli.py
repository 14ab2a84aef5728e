"""The `pro-jax` command line: one subcommand per stage of PRO, plus the engine's `train` and `aot`.

    pro-jax train --config tiny_lm --workdir /tmp/run --config.optim.lr=1e-3
    pro-jax aot --config llama2_7b_dpo --topology v5e:4x4
    pro-jax <command> --help

A subcommand is a `Command` (`pro_jax.train.commands`: name, one-line help, `add_arguments(parser)`, `run(args) -> exit code`).
Stages register theirs by adding `"name": "module.path:ATTRIBUTE"` to `COMMANDS` below (imported when
the parser is built), or at run time with `register_command`.

Exit codes: 0 done; 1 failure; 2 bad usage or config (reported before anything is compiled or
written); 75 preempted (SIGTERM: a checkpoint was saved; run the same command again to resume).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pro_jax.configs import ConfigError
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
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for name, cmd in cmds.items():
    p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_arguments(p)
  return parser


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
  except ConfigError as e:
    print(f"pro-jax {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
