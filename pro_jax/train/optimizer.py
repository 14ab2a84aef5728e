"""AdamW with linear warmup, cosine / linear / constant decay and global-norm clipping (Optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

DECAYS = ("cosine", "linear", "constant")


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer update: 0 -> lr over `warmup_steps`, then decay to lr * end_lr_factor
  at `total_steps` (cosine or linear), or stay at lr (constant)."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  end = lr * float(optim_cfg.end_lr_factor)
  decay_steps = max(int(total_steps) - warmup, 1)
  if optim_cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_cfg.end_lr_factor))
  elif optim_cfg.decay == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif optim_cfg.decay == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.decay must be one of {DECAYS}, got {optim_cfg.decay!r}")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: everything but norm scales and biases."""

  def keep(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name not in ("scale", "bias")

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from the `optim` config section."""
  schedule = make_schedule(optim_cfg, total_steps)
  parts = []
  if float(optim_cfg.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                           weight_decay=float(optim_cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts), schedule
