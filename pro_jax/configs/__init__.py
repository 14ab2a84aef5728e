"""Python config files (big_vision style) and command-line overrides.

A config file defines `get_config()` (optionally `get_config(arg)`) returning an
`ml_collections.ConfigDict`, normally built from `base.base_config()`. Load one by name (a module
in this package: `tiny_lm`, `llama2_7b_dpo`, ...) or by path (`path/to/my_config.py`); `NAME:ARG`
passes ARG to `get_config`.

Overrides `--config.optim.lr=1e-5` (or `--config.optim.lr 1e-5`) are checked against the loaded
config: an unknown key fails with a "did you mean" hint, a value is parsed by the type of the value
it replaces (bool, int, float, str, tuple; None-valued fields take a Python literal or a string).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import os
import importlib
import importlib.util
import pathlib
import pkgutil
from collections.abc import Sequence
from typing import Any

import ml_collections as mc

OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
  """A config that cannot run: unknown key, wrong type, inconsistent values. Raised before compiling."""


def list_configs() -> list[str]:
  """Names of the config files shipped in this package."""
  here = pathlib.Path(__file__).parent
  return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name != "base")


def load_module_file(path: str | os.PathLike, module_name: str) -> Any:
  """Execute the Python file at `path` as a fresh module named `module_name` (config files, and the
  helper modules that config files outside the package share, e.g. experiments/common.py)."""
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)  # type: ignore[union-attr]
  return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> mc.ConfigDict:
  """Config from a name or path (`NAME[:ARG]`), with `--config.KEY=VALUE` overrides applied."""
  name, _, arg = spec.partition(":")
  path = pathlib.Path(name)
  if name.endswith(".py") or path.exists():
    if not path.is_file():
      raise ConfigError(f"config file {name} does not exist")
    module = load_module_file(path, f"_pro_jax_config_{path.stem}")
  else:
    if name not in list_configs():
      close = difflib.get_close_matches(name, list_configs(), n=1)
      hint = f"; did you mean {close[0]}?" if close else ""
      raise ConfigError(f"unknown config {name!r} (neither a file nor one of {list_configs()}){hint}")
    module = importlib.import_module(f"pro_jax.configs.{name}")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config {spec}: the file defines no get_config()")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except (AttributeError, TypeError, KeyError) as e:  # a locked key or a typed field set wrongly
    raise ConfigError(f"config {spec}: {_clean(e)}") from e
  if not isinstance(cfg, mc.ConfigDict):
    raise ConfigError(f"config {spec}: get_config() must return an ml_collections.ConfigDict")
  apply_overrides(cfg, overrides)
  return cfg


def _clean(e: BaseException) -> str:
  return str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")


def leaf_keys(cfg: mc.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of every field (sections are recursed into)."""
  out = []
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, mc.ConfigDict):
      out.extend(leaf_keys(v, key + "."))
    else:
      out.append(key)
  return out


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
  """[(key, raw value)] from `--config.a.b=v` / `--config.a.b v` tokens; anything else is an error."""
  out, i = [], 0
  args = list(args)
  while i < len(args):
    tok = args[i]
    if not tok.startswith(OVERRIDE_PREFIX):
      raise ConfigError(f"unrecognized argument {tok!r} (config overrides look like --config.optim.lr=1e-5)")
    body = tok[len(OVERRIDE_PREFIX):]
    if "=" in body:
      key, value = body.split("=", 1)
    else:
      if i + 1 >= len(args):
        raise ConfigError(f"{tok}: missing value")
      key, value = body, args[i + 1]
      i += 1
    out.append((key, value))
    i += 1
  return out


def _parse_bool(key: str, raw: str) -> bool:
  low = raw.strip().lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise ConfigError(f"{key}: expected a bool (true/false), got {raw!r}")


def parse_value(key: str, raw: str, current: Any) -> Any:
  """Parse `raw` for the field `key` whose current value is `current`."""
  if isinstance(current, mc.ConfigDict):
    raise ConfigError(f"{key} is a section; override its fields ({key}.<field>=...)")
  if isinstance(current, bool):
    return _parse_bool(key, raw)
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"{key}: expected an int, got {raw!r}") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"{key}: expected a float, got {raw!r}") from None
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  if current is None:
    try:
      return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
  raise ConfigError(f"{key}: cannot override a value of type {type(current).__name__}")


def unknown_key_message(cfg: mc.ConfigDict, key: str) -> str:
  close = difflib.get_close_matches(key, leaf_keys(cfg), n=1, cutoff=0.6)
  return f"unknown key {key}" + (f"; did you mean {close[0]}?" if close else "")


def apply_overrides(cfg: mc.ConfigDict, overrides: Sequence[str] | Sequence[tuple[str, str]]) -> mc.ConfigDict:
  """Apply `--config.KEY=VALUE` overrides in place (all problems are reported together)."""
  pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else list(overrides)
  errors = []
  for key, raw in pairs:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
      if not isinstance(node, mc.ConfigDict) or p not in node:
        node = None
        break
      node = node[p]
    if not isinstance(node, mc.ConfigDict) or parts[-1] not in node:
      errors.append(unknown_key_message(cfg, key))
      continue
    try:
      value = parse_value(key, raw, node[parts[-1]])
      with node.ignore_type() if node[parts[-1]] is None else contextlib.nullcontext():
        node[parts[-1]] = value
    except ConfigError as e:
      errors.append(str(e))
    except (TypeError, ValueError) as e:
      errors.append(f"{key}: {_clean(e)}")
  if errors:
    raise ConfigError("invalid config override(s):\n  " + "\n  ".join(errors))
  return cfg

