"""`Task`, `setup` and `train(cfg, workdir, task)`: one batch per step on the engine's run loop
(`pro_jax.train.loop.RunLoop`, which PPO shares).

A stage describes what it trains as a `Task` (the loss, the trained model's variables and how to
initialize them, frozen inputs, data, the batch's shapes); the engine does the rest:

1. mesh and rules from the config, shardings from the model's logical axes;
2. the workdir guard: a workdir holding a run with a different config is an error unless
   `existing="resume"` (continue it with the new config) or `"overwrite"` (delete it);
3. restore the newest complete checkpoint (state, data position, base variables) or initialize;
4. the step, compiled once (`build_train_step`), fed each host's rows of the global batch;
5. metrics (JSONL / TensorBoard / W&B, progress bar with step/s, tokens/s, loss, MFU) every
   `log.every_steps`; an async checkpoint every `checkpoint.every_steps` and at the end;
6. SIGTERM (the TPU preemption notice) saves a checkpoint at the next step boundary and returns with
   `status="preempted"`; a non-finite loss / gradient skips the update (counted in the state) and,
   with `guards.nonfinite="stop"`, stops the run with `NonFiniteError` (nothing is saved for it).

`setup(cfg, task, mesh)` builds steps 1 and 4 from abstract shapes only; `pro-jax aot` uses it to
compile the same step for a TPU topology.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from pro_jax import sharding
from pro_jax.train import flops as train_flops
from pro_jax.train.config import config_to_dict, validate_config
from pro_jax.train.loop import (CONFIG_FILE, NonFiniteError, Preempted, RunLoop, StepOutput, WorkdirError,  # noqa: F401
                                prepare_workdir, raise_if_preempted)
from pro_jax.train.optimizer import make_optimizer
from pro_jax.train.state import TrainState, abstract_state, split_variables, state_shardings, with_shardings
from pro_jax.train.step import LossFn, TrainStep, build_train_step

log = logging.getLogger("pro_jax")


def jit_init(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wrap a jit-able `fn(*args) -> tree` as `init(*args, shardings)` creating the tree sharded."""
  return lambda *args, shardings: jax.jit(fn, out_shardings=shardings)(*args)


@dataclasses.dataclass
class Task:
  """What a stage plugs into the engine.

  loss_fn: `(params, frozen, batch, rng) -> (loss, metrics)`; see `pro_jax.train.step`.
  abstract_variables / logical_axes: ShapeDtypeStructs and logical PartitionSpecs of the trained
    model's full variables (`pro_jax.models.abstract_variables` / `logical_axes`).
  init_variables: `(rng, shardings=...) -> variables`, created with those shardings (`jit_init`).
  batch_spec: ShapeDtypeStructs of one GLOBAL batch (leading dim = cfg.batch_size).
  make_data: `(rows: slice) -> iterator` of this host's rows of each global batch, with
    `get_state()` / `set_state()`.
  frozen_abstract / frozen_logical_axes / init_frozen: extra inputs without gradients (reference
    policy, reward models): a dict; `init_frozen(shardings=...) -> dict` materializes it.
  model_config: the trained model's `ModelConfig` (saved for `load_checkpoint`; FLOPs).
  tokens_per_step: tokens processed per step (for tokens/s); flops_per_step: model FLOPs (MFU).
  extra / extra_arrays: metadata saved with every checkpoint (JSON dict / array pytree).
  """

  loss_fn: LossFn
  abstract_variables: Any
  logical_axes: Any
  init_variables: Callable[..., Any]
  batch_spec: dict[str, jax.ShapeDtypeStruct]
  make_data: Callable[[slice], Any] | None = None
  frozen_abstract: dict = dataclasses.field(default_factory=dict)
  frozen_logical_axes: dict = dataclasses.field(default_factory=dict)
  init_frozen: Callable[..., dict] | None = None
  model_config: Any = None
  tokens_per_step: int = 0
  flops_per_step: float | None = None
  extra: dict | None = None
  extra_arrays: Any = None
  name: str = "train"


@dataclasses.dataclass
class Setup:
  """Everything about the step that follows from (config, task, mesh) without touching data or weights."""

  mesh: Mesh
  rules: tuple
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  trainable_abstract: Any
  base_abstract: Any  # the non-trainable collections of the trained model (with shardings)
  state_shardings: TrainState
  abstract_state: TrainState  # with shardings
  frozen_abstract: dict  # {"base": ..., **task.frozen_abstract} with shardings
  frozen_shardings: dict
  batch_abstract: dict  # with shardings
  batch_shardings: dict
  step: TrainStep


def setup(cfg: Any, task: Task, mesh: Mesh, *, donate: bool = True) -> Setup:
  rules = sharding.rules_from_config(cfg.sharding.rules)
  optimizer, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  var_sh = sharding.param_shardings(task.logical_axes, task.abstract_variables, mesh, rules)
  trainable_abs, base_abs = split_variables(task.abstract_variables, cfg.trainable)
  trainable_sh, base_sh = split_variables(var_sh, cfg.trainable)
  st_sh = state_shardings(trainable_sh, trainable_abs, optimizer, mesh)
  frozen_sh = {"base": base_sh}
  frozen_abs = {"base": with_shardings(base_abs, base_sh)}
  if task.frozen_abstract:
    extra_sh = sharding.param_shardings(task.frozen_logical_axes, task.frozen_abstract, mesh, rules)
    frozen_sh.update(extra_sh)
    frozen_abs.update(with_shardings(task.frozen_abstract, extra_sh))
  batch_sh = sharding.batch_shardings(task.batch_spec, mesh)
  step = build_train_step(task.loss_fn, optimizer, mesh=mesh, state_shardings=st_sh, frozen_shardings=frozen_sh,
                          batch_shardings=batch_sh, n_micro=cfg.n_micro, schedule=schedule, rules=rules,
                          donate=donate)
  return Setup(mesh=mesh, rules=rules, optimizer=optimizer, schedule=schedule, trainable_abstract=trainable_abs,
               base_abstract=frozen_abs["base"], state_shardings=st_sh,
               abstract_state=abstract_state(trainable_abs, optimizer, st_sh), frozen_abstract=frozen_abs,
               frozen_shardings=frozen_sh, batch_abstract=with_shardings(task.batch_spec, batch_sh),
               batch_shardings=batch_sh, step=step)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  status: str  # "done" | "preempted"
  last_metrics: dict
  resumed_from: int | None


def _check_batch(batch: dict, spec: dict, rows: slice) -> None:
  if set(batch) != set(spec):
    raise ValueError(f"data batch keys {sorted(batch)} differ from the task's batch_spec {sorted(spec)}")
  n = rows.stop - rows.start
  for k, s in spec.items():
    want = (n,) + tuple(s.shape[1:])
    if tuple(np.shape(batch[k])) != want:
      raise ValueError(f"data batch field {k!r} has shape {np.shape(batch[k])}, expected {want} "
                       "(static shapes: a different shape would recompile the step)")


def train(cfg: Any, workdir: str | os.PathLike, task: Task, *, existing: str = "auto",
          mesh: Mesh | None = None, on_event: Callable[[str, int], None] | None = None) -> TrainResult:
  """Run (or resume) training to `cfg.total_steps`. See the module docstring.

  on_event(name, step): test / debugging hook called at "step_dispatched", "save_started",
  "save_dispatched" (async write in progress), "save_finished" (after the final wait) and "preempted".
  """
  event = on_event or (lambda name, step: None)
  validate_config(cfg)
  cfg_json = config_to_dict(cfg)
  mesh = mesh if mesh is not None else sharding.mesh_from_config(cfg.mesh)
  su = setup(cfg, task, mesh)
  meta = {"config": cfg_json, "trainable": cfg.trainable,
          "model_config": task.model_config.to_dict() if task.model_config is not None else None}
  loop = RunLoop(cfg, workdir, su, cfg_json=cfg_json, meta=meta, total=cfg.total_steps, desc=task.name,
                 existing=existing, on_event=on_event)
  rows = sharding.host_batch_rows(cfg.batch_size, mesh)
  data = task.make_data(rows)

  def on_restore(restored):
    if restored.data_state is not None:
      data.set_state(restored.data_state)

  var_sh = sharding.param_shardings(task.logical_axes, task.abstract_variables, mesh, su.rules)
  loop.restore_or_init(lambda: task.init_variables(jax.random.PRNGKey(cfg.seed), shardings=var_sh),
                       on_restore=on_restore)
  frozen = {"base": loop.base}
  if task.init_frozen is not None:
    frozen.update(task.init_frozen(shardings={k: v for k, v in su.frozen_shardings.items() if k != "base"}))

  peak = train_flops.peak_flops(jax.devices()[0].device_kind)
  total = int(cfg.total_steps)
  clock = {"time": time.perf_counter(), "step": loop.start}
  last = {"metrics": {}, "device": None}

  def body(s: int) -> StepOutput:
    try:
      host_batch = next(data)
    except StopIteration:
      raise RuntimeError(f"the data ran out at step {s} of {total}") from None
    _check_batch(host_batch, task.batch_spec, rows)
    batch = sharding.host_local_to_global(host_batch, mesh, cfg.batch_size)
    loop.state, metrics = su.step(loop.state, frozen, batch)
    last["device"] = metrics
    event("step_dispatched", s)
    bar = {"tokens": task.tokens_per_step or None}
    host = None
    if s % cfg.log.every_steps == 0 or s == total:
      host = jax.device_get(metrics)
      now = time.perf_counter()
      sec = (now - clock["time"]) / max(s - clock["step"], 1)
      clock["time"], clock["step"] = now, s
      host["steps_per_s"] = 1.0 / sec if sec > 0 else 0.0
      if task.tokens_per_step:
        host["tokens_per_s"] = task.tokens_per_step / sec if sec > 0 else 0.0
      if task.flops_per_step and peak:
        host["mfu"] = train_flops.mfu(task.flops_per_step, sec, jax.device_count(), peak)
      host["nonfinite_count"] = int(jax.device_get(loop.state.nonfinite_count))
      bar.update(loss=host["loss"], extra={"skipped": host["nonfinite_count"]} if host["nonfinite_count"] else None)
      last["metrics"] = host
    # checked one step behind (guard_lag=1): the device stays busy
    return StepOutput(log=host, bar=bar, nonfinite=metrics["nonfinite"])

  result = loop.run(body, checkpoint=lambda s: (data.get_state(), task.extra, task.extra_arrays), guard_lag=1)
  last_metrics = last["metrics"]
  if not last_metrics and result.status == "done" and total > loop.start:
    last_metrics = jax.device_get(last["device"])
  return TrainResult(state=result.state, step=result.step, status=result.status, last_metrics=last_metrics,
                     resumed_from=result.resumed_from)


__all__ = ["Task", "Setup", "setup", "train", "TrainResult", "jit_init", "prepare_workdir", "WorkdirError",
           "NonFiniteError", "Preempted", "raise_if_preempted", "CONFIG_FILE"]
