"""Config checks that run BEFORE anything is compiled or written, and config <-> model / JSON helpers."""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections as mc

from pro_jax.configs import ConfigError
from pro_jax.configs.base import base_config
from pro_jax.models import LoRAConfig, ModelConfig, RopeScaling
from pro_jax.sharding import MeshError, resolve_mesh_shape, rules_from_config
from pro_jax.train.guards import guard_config_errors, optimizer_hparam_errors
from pro_jax.train.optimizer import DECAYS
from pro_jax.train.state import TRAINABLE


def config_to_dict(cfg: mc.ConfigDict) -> dict:
  """A JSON-able dict (tuples become lists)."""
  return json.loads(cfg.to_json())


def model_config_from(model_cfg: Any) -> ModelConfig:
  """`ModelConfig` from the `model` config section (`lora.rank = 0` means no LoRA)."""
  d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  lora = dict(d.pop("lora", None) or {})
  d["lora"] = None if int(lora.get("rank", 0)) <= 0 else LoRAConfig(
      rank=int(lora["rank"]), alpha=float(lora.get("alpha", 16.0)), dropout=float(lora.get("dropout", 0.0)),
      targets=tuple(lora.get("targets", ("q_proj", "v_proj"))))
  rs = d.pop("rope_scaling", None)
  d["rope_scaling"] = RopeScaling(**rs) if isinstance(rs, dict) else RopeScaling()
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from None


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def dtype_errors(field: str, name: Any) -> list[str]:
  """[] when `name` is a floating-point dtype name the model can compute / store in."""
  if name not in FLOAT_DTYPES:
    return [f"{field}={name!r} is not a floating-point dtype; use one of {', '.join(FLOAT_DTYPES)}"]
  return []


def validate_config(cfg: mc.ConfigDict, num_devices: int | None = None) -> list[str]:
  """Raise ConfigError listing every problem found (mesh vs devices, batch divisibility, values).

  `num_devices`: devices the mesh must cover (default `jax.device_count()`). Returns [] when fine.
  """
  errors = config_errors(cfg, num_devices)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  return errors


def config_errors(cfg: mc.ConfigDict, num_devices: int | None = None) -> list[str]:
  """Every problem `validate_config` reports, as a list (the PRO stages prefix them with their
  section: `pro_jax.stages.checks`)."""
  import jax

  n = jax.device_count() if num_devices is None else num_devices
  errors: list[str] = []

  def check(cond: bool, msg: str):
    if not cond:
      errors.append(msg)

  m = cfg.mesh
  mesh_shape = None
  try:
    mesh_shape = resolve_mesh_shape(m.data, m.fsdp, m.tensor, n)
  except MeshError as e:
    errors.append(f"mesh: {e}")
  try:
    rules_from_config(cfg.sharding.rules)
  except ValueError as e:
    errors.append(f"sharding.rules: {e}")
  check(cfg.total_steps >= 1, f"total_steps must be >= 1, got {cfg.total_steps}")
  check(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
  check(cfg.n_micro >= 1, f"n_micro must be >= 1, got {cfg.n_micro}")
  if mesh_shape is not None and cfg.batch_size >= 1 and cfg.n_micro >= 1:
    dp = mesh_shape[0] * mesh_shape[1]
    if cfg.batch_size % dp:
      errors.append(f"batch_size={cfg.batch_size} is not divisible by the data-parallel size "
                    f"data x fsdp = {mesh_shape[0]} x {mesh_shape[1]} = {dp} "
                    f"(mesh data={mesh_shape[0]} fsdp={mesh_shape[1]} tensor={mesh_shape[2]} on {n} devices)")
    elif (cfg.batch_size // dp) % cfg.n_micro:
      errors.append(f"batch_size={cfg.batch_size} gives {cfg.batch_size // dp} example(s) per batch shard "
                    f"(data x fsdp = {dp}), not divisible by n_micro={cfg.n_micro}: batch_size must be a "
                    f"multiple of {dp * cfg.n_micro}")
  check(cfg.trainable in TRAINABLE, f"trainable must be one of {sorted(TRAINABLE)}, got {cfg.trainable!r}")
  if cfg.trainable == "lora":
    check(cfg.model.lora.rank > 0, "trainable='lora' needs model.lora.rank > 0")
  try:
    mc_ = model_config_from(cfg.model)
    if "seq_len" in cfg.data:
      check(cfg.data.seq_len <= mc_.max_seq_len,
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={mc_.max_seq_len}")
  except ConfigError as e:
    errors.append(str(e))
  for name in ("dtype", "param_dtype"):
    errors.extend(dtype_errors(f"model.{name}", cfg.model[name]))
  if "reference" in cfg and cfg.reference.get("param_dtype"):
    errors.extend(dtype_errors("reference.param_dtype", cfg.reference.param_dtype))
  o = cfg.optim
  check(isinstance(o.lr, (int, float)) and o.lr > 0 and math.isfinite(o.lr),
        f"optim.lr must be a positive number, got {o.lr}")
  check(0 <= o.warmup_steps <= cfg.total_steps,
        f"optim.warmup_steps must be in [0, total_steps={cfg.total_steps}], got {o.warmup_steps}")
  check(o.decay in DECAYS, f"optim.decay must be one of {DECAYS}, got {o.decay!r}")
  check(0 <= o.end_lr_factor <= 1, f"optim.end_lr_factor must be in [0, 1], got {o.end_lr_factor}")
  check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1 / b2 must be in [0, 1), got {o.b1}, {o.b2}")
  check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
  check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
  errors.extend(e for e in optimizer_hparam_errors(o, cfg.model.param_dtype) if e not in errors)
  errors.extend(guard_config_errors(cfg.guards))
  check(cfg.checkpoint.every_steps >= 1, f"checkpoint.every_steps must be >= 1, got {cfg.checkpoint.every_steps}")
  check(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
  check(cfg.log.every_steps >= 1, f"log.every_steps must be >= 1, got {cfg.log.every_steps}")
  if "profile" in cfg:
    check(cfg.profile.start_step >= 0 and cfg.profile.num_steps >= 0,
          f"profile.start_step / num_steps must be >= 0, got {cfg.profile.start_step}, {cfg.profile.num_steps}")
  check(str(cfg.distributed.initialize).lower() in ("auto", "always", "never", "true", "false"),
        f"distributed.initialize must be 'auto', 'always' or 'never', got {cfg.distributed.initialize!r}")
  return errors


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Human-readable differences between two JSON-able config dicts."""
  out = []
  if isinstance(old, dict) and isinstance(new, dict):
    for k in sorted(set(old) | set(new)):
      key = f"{prefix}{k}"
      if k not in old:
        out.append(f"{key}: (absent) -> {new[k]!r}")
      elif k not in new:
        out.append(f"{key}: {old[k]!r} -> (absent)")
      else:
        out.extend(config_diff(old[k], new[k], key + "."))
  elif old != new:
    out.append(f"{prefix.rstrip('.')}: {old!r} -> {new!r}")
  return out


def with_new_defaults(old: dict, new: dict) -> dict:
  """`old` (a saved run's config) plus every key the base schema gained since, where `new` holds that
  key at its base default: a run saved before a setting existed is the same run with its default
  (e.g. `guards.max_skipped_fraction`), so it still resumes without --resume."""
  defaults = config_to_dict(base_config())

  def fill(o: dict, n: dict, d: dict) -> dict:
    out = dict(o)
    for k, dv in d.items():
      if k not in n:
        continue
      if k not in o:
        if n[k] == dv:
          out[k] = dv
      elif isinstance(o[k], dict) and isinstance(n[k], dict) and isinstance(dv, dict):
        out[k] = fill(o[k], n[k], dv)
    return out

  return fill(old, new, defaults)
