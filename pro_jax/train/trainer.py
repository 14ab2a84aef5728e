"""The training loop shared by every stage: `train(cfg, workdir, task)`.

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
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from pro_jax import sharding as shd
from pro_jax.configs import ConfigError
from pro_jax.train import logging as tlog
from pro_jax.train.checkpoint import CHECKPOINTS_DIR, Checkpointer, as_path, base_for_fresh_run, restore_base
from pro_jax.train.config import config_diff, config_to_dict, validate_config
from pro_jax.train.optimizer import make_optimizer
from pro_jax.train.profile import StepProfiler
from pro_jax.train.progress import ProgressLog
from pro_jax.train.state import (TrainState, abstract_state, init_state, split_variables, state_shardings,
                                 with_shardings)
from pro_jax.train.step import LossFn, TrainStep, build_train_step

log = logging.getLogger("pro_jax")
CONFIG_FILE = "config.json"


class WorkdirError(RuntimeError):
  """The workdir holds another run; pass existing='resume' or 'overwrite', or use another workdir."""


class NonFiniteError(RuntimeError):
  """guards.nonfinite='stop' and a step produced a non-finite loss or gradient."""


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
  rules = shd.rules_from_config(cfg.sharding.rules)
  optimizer, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  var_sh = shd.param_shardings(task.logical_axes, task.abstract_variables, mesh, rules)
  trainable_abs, base_abs = split_variables(task.abstract_variables, cfg.trainable)
  trainable_sh, base_sh = split_variables(var_sh, cfg.trainable)
  st_sh = state_shardings(trainable_sh, trainable_abs, optimizer, mesh)
  frozen_sh = {"base": base_sh}
  frozen_abs = {"base": with_shardings(base_abs, base_sh)}
  if task.frozen_abstract:
    extra_sh = shd.param_shardings(task.frozen_logical_axes, task.frozen_abstract, mesh, rules)
    frozen_sh.update(extra_sh)
    frozen_abs.update(with_shardings(task.frozen_abstract, extra_sh))
  batch_sh = shd.batch_shardings(task.batch_spec, mesh)
  step = build_train_step(task.loss_fn, optimizer, mesh=mesh, state_shardings=st_sh, frozen_shardings=frozen_sh,
                          batch_shardings=batch_sh, n_micro=cfg.n_micro, schedule=schedule, rules=rules,
                          donate=donate)
  return Setup(mesh=mesh, rules=rules, optimizer=optimizer, schedule=schedule, trainable_abstract=trainable_abs,
               base_abstract=frozen_abs["base"], state_shardings=st_sh,
               abstract_state=abstract_state(trainable_abs, optimizer, st_sh), frozen_abstract=frozen_abs,
               frozen_shardings=frozen_sh, batch_abstract=with_shardings(task.batch_spec, batch_sh),
               batch_shardings=batch_sh, step=step)


# ---------------------------------------------------------------------------------------------
# Workdir guard


def prepare_workdir(workdir: str | os.PathLike, cfg_json: dict, existing: str = "auto") -> None:
  """Make `workdir` hold this run's config; refuse to mix two runs in one directory.

  existing: "auto" (continue a run with the same config, error on a different one), "resume"
  (continue even with a different config; the new one is recorded, the old kept as
  config.<n>.json), "overwrite" (delete the old run's checkpoints, base, config and logs first).
  """
  if existing not in ("auto", "resume", "overwrite"):
    raise ValueError(f"existing must be 'auto', 'resume' or 'overwrite', got {existing!r}")
  workdir = as_path(workdir)
  cfg_path = workdir / CONFIG_FILE
  ck_dir = workdir / CHECKPOINTS_DIR
  has_run = cfg_path.exists() or (ck_dir.is_dir() and any(ck_dir.iterdir()))
  if has_run and existing == "overwrite":
    if jax.process_index() == 0:
      for name in (CHECKPOINTS_DIR, "base", "tb"):
        if (workdir / name).exists():
          (workdir / name).rmtree()
      for name in (CONFIG_FILE, tlog.METRICS_FILE):
        if (workdir / name).exists():
          (workdir / name).unlink()
    has_run = False
  if has_run:
    if not cfg_path.exists():
      if existing != "resume":
        raise WorkdirError(f"{workdir} holds checkpoints but no {CONFIG_FILE}; pass --resume to continue "
                           "them with this config, --overwrite to delete them, or use another workdir")
    else:
      old = json.loads(cfg_path.read_text())
      diff = config_diff(old, cfg_json)
      if diff and existing == "auto":
        raise WorkdirError(
            f"{workdir} holds a run with a different config:\n  " + "\n  ".join(diff[:20]) +
            "\npass --resume to continue it with the new config, --overwrite to delete it, or use another workdir")
      if diff and jax.process_index() == 0:
        n = 1
        while (workdir / f"config.{n}.json").exists():
          n += 1
        cfg_path.copy(workdir / f"config.{n}.json")
      if not diff:
        return
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    tmp.replace(cfg_path)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  status: str  # "done" | "preempted"
  last_metrics: dict
  resumed_from: int | None


class _Preemption:
  """SIGTERM -> a flag checked at step boundaries (multi-host: JAX's preemption sync point)."""

  def __init__(self):
    self.flag = False
    self._old = None
    self.multihost = jax.process_count() > 1

  def __enter__(self):
    if not self.multihost:
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # noqa: BLE001 (no preemption service)
        return False
    return self.flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _check_batch(batch: dict, spec: dict, rows: slice) -> None:
  if set(batch) != set(spec):
    raise ValueError(f"data batch keys {sorted(batch)} differ from the task's batch_spec {sorted(spec)}")
  n = rows.stop - rows.start
  for k, s in spec.items():
    want = (n,) + tuple(s.shape[1:])
    if tuple(np.shape(batch[k])) != want:
      raise ValueError(f"data batch field {k!r} has shape {np.shape(batch[k])}, expected {want} "
                       "(static shapes: a different shape would recompile the step)")


def _defaults_json() -> dict:
  from pro_jax.configs.base import base_config

  return config_to_dict(base_config())


def _profile_args(cfg: Any) -> dict:
  p = cfg.get("profile") if hasattr(cfg, "get") else None
  return {"start_step": int(p.start_step), "num_steps": int(p.num_steps)} if p is not None else {}


def train(cfg: Any, workdir: str | os.PathLike, task: Task, *, existing: str = "auto",
          mesh: Mesh | None = None, on_event: Callable[[str, int], None] | None = None) -> TrainResult:
  """Run (or resume) training to `cfg.total_steps`. See the module docstring.

  on_event(name, step): test / debugging hook called at "step_dispatched", "save_started",
  "save_dispatched" (async write in progress), "save_finished" (after the final wait) and "preempted".
  """
  event = on_event or (lambda name, step: None)
  workdir = as_path(workdir)
  validate_config(cfg)
  cfg_json = config_to_dict(cfg)
  mesh = mesh if mesh is not None else shd.mesh_from_config(cfg.mesh)
  su = setup(cfg, task, mesh)
  prepare_workdir(workdir, cfg_json, existing)

  ckpt = Checkpointer(workdir / CHECKPOINTS_DIR, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  rows = shd.host_batch_rows(cfg.batch_size, mesh)
  data = task.make_data(rows)
  base_sh = su.frozen_shardings["base"]
  resumed_from = None
  if ckpt.all_steps():
    restored = ckpt.restore(su.abstract_state)
    state, start, resumed_from = restored.state, restored.step, restored.step
    if restored.data_state is not None:
      data.set_state(restored.data_state)
    base = restore_base(workdir, su.base_abstract) if jax.tree.leaves(su.base_abstract) else {}
    if base is None:
      raise FileNotFoundError(f"{workdir}/base is missing: cannot resume a {cfg.trainable} run without its "
                              "base variables")
    log.info("resumed from step %d (%s)", start, ckpt.directory)
  else:
    var_sh = shd.param_shardings(task.logical_axes, task.abstract_variables, mesh, su.rules)
    variables = task.init_variables(jax.random.PRNGKey(cfg.seed), shardings=var_sh)
    trainable, base = split_variables(variables, cfg.trainable)
    base = base_for_fresh_run(workdir, base, su.base_abstract)
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    state = jax.jit(lambda p, r: init_state(p, su.optimizer, r), out_shardings=su.state_shardings,
                    donate_argnums=(0,))(trainable, rng)
    start = 0
  frozen = {"base": base}
  if task.init_frozen is not None:
    frozen.update(task.init_frozen(shardings={k: v for k, v in su.frozen_shardings.items() if k != "base"}))
  meta = {"config": cfg_json, "trainable": cfg.trainable,
          "model_config": task.model_config.to_dict() if task.model_config is not None else None}

  logger = tlog.MetricsLogger(workdir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project or None,
                              config=cfg_json, resume_step=start)  # drops lines logged after the checkpoint
  bar = tlog.ProgressBar(cfg.total_steps, desc=task.name, initial=start,
                         disable=None if cfg.log.progress else True)
  peak = tlog.peak_flops(jax.devices()[0].device_kind)
  total = int(cfg.total_steps)
  progress = ProgressLog(task.name, total, start, every_steps=cfg.log.every_steps, tokens_per_step=task.tokens_per_step,
                         enabled=None if cfg.log.progress else False)  # lines when stderr is not a TTY
  progress.start(workdir, cfg_json, _defaults_json(), tensorboard=cfg.log.tensorboard)
  profiler = StepProfiler(workdir, **_profile_args(cfg))
  last_metrics: dict = {}
  status = "done"
  prev_metrics = None
  t_mark, s_mark = time.perf_counter(), start

  def save(s: int):
    event("save_started", s)
    ckpt.save(s, state, data_state=data.get_state(), extra=task.extra, arrays=task.extra_arrays, meta=meta)
    event("save_dispatched", s)  # arrays copied to host; files being written in the background
    logger.sync()  # gs:// workdir: the metrics up to this checkpoint reach the bucket with it (a new VM resumes)

  try:
    with _Preemption() as preempt:
      for s in range(start + 1, total + 1):
        try:
          host_batch = next(data)
        except StopIteration:
          raise RuntimeError(f"the data ran out at step {s} of {total}") from None
        _check_batch(host_batch, task.batch_spec, rows)
        batch = shd.host_local_to_global(host_batch, mesh, cfg.batch_size)
        profiler.before_step(s)
        state, metrics = su.step(state, frozen, batch)
        event("step_dispatched", s)
        progress.step_done(s, metrics)
        profiler.after_step(s, metrics)
        if cfg.guards.nonfinite == "stop":  # checked one step behind: the device stays busy
          if prev_metrics is not None and float(prev_metrics["nonfinite"]) > 0:
            raise NonFiniteError(f"step {s - 1}: non-finite loss or gradient (guards.nonfinite='stop'); "
                                 "its update was skipped, later steps were not saved")
          prev_metrics = metrics
        bar.update(s, tokens=task.tokens_per_step or None)
        if s % cfg.log.every_steps == 0 or s == total:
          host = jax.device_get(metrics)
          now = time.perf_counter()
          sec = (now - t_mark) / max(s - s_mark, 1)
          t_mark, s_mark = now, s
          host["steps_per_s"] = 1.0 / sec if sec > 0 else 0.0
          if task.tokens_per_step:
            host["tokens_per_s"] = task.tokens_per_step / sec if sec > 0 else 0.0
          if task.flops_per_step and peak:
            host["mfu"] = tlog.mfu(task.flops_per_step, sec, jax.device_count(), peak)
          host["nonfinite_count"] = int(jax.device_get(state.nonfinite_count))
          logger.log(s, host)
          progress.log(s, host)
          bar.update(s, loss=host["loss"], extra={"skipped": host["nonfinite_count"]} if host["nonfinite_count"] else None)
          last_metrics = host
        stop = preempt.reached(s)
        if s % cfg.checkpoint.every_steps == 0 or s == total or stop:
          save(s)
        if stop:
          status = "preempted"
          event("preempted", s)
          break
      if cfg.guards.nonfinite == "stop" and prev_metrics is not None and float(prev_metrics["nonfinite"]) > 0:
        raise NonFiniteError(f"step {s}: non-finite loss or gradient (guards.nonfinite='stop')")
    ckpt.wait()
    event("save_finished", s if total > start else start)
    final = s if total > start else start
    progress.end(final, status, ckpt.directory / str(final) if final in ckpt.all_steps() else None)
  finally:
    profiler.close()
    bar.close()
    logger.close()
    ckpt.close()
  if not last_metrics and status == "done" and total > start:
    last_metrics = jax.device_get(metrics)
  return TrainResult(state=state, step=s if total > start else start, status=status, last_metrics=last_metrics,
                     resumed_from=resumed_from)
