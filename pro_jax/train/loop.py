"""The engine's run loop, shared by every run: `trainer.train` (one batch per step) and the PPO stage
(one rollout and its minibatch updates per iteration, `pro_jax.stages.ppo`).

    loop = RunLoop(cfg, workdir, su, cfg_json=cfg_json, meta=meta, total=cfg.total_steps, desc="sft")
    loop.restore_or_init(init_variables, on_restore=lambda restored: data.set_state(restored.data_state))
    result = loop.run(body, checkpoint=lambda step: (data.get_state(), extra, arrays))

`RunLoop` owns what every run needs around its step:

1. the workdir guard (`prepare_workdir`: a workdir holding a run with another config is an error
   unless `existing="resume"` or `"overwrite"`);
2. restore the newest complete checkpoint (state, base variables; `on_restore` reads the run's own
   position: data iterator, PPO's prompt position and KL coefficient) or initialize the state;
3. the metrics logger (JSONL / TensorBoard / W&B; lines logged after the restored checkpoint are
   dropped; copied to a gs:// workdir at every checkpoint), the progress bar on a terminal, progress
   lines otherwise (`pro_jax.train.progress`), a profile of `profile.start_step..` (`pro_jax.train.profile`);
4. SIGTERM (the TPU preemption notice; multi-host: JAX's preemption sync point): a checkpoint at the
   next step boundary, then `status="preempted"`;
5. the non-finite guards (`pro_jax.train.guards`): `guards.nonfinite="stop"` raises `NonFiniteError`
   (nothing saved for that step); no state holding a non-finite value is ever saved (checked before
   every save); a run that skipped more than `guards.max_skipped_fraction` of its updates fails with
   `TooManySkippedError` (at a log step once the limit can no longer be met, or at the end);
6. a checkpoint every `checkpoint.every_steps` and at the end (an unreadable newest checkpoint is
   moved aside by `Checkpointer.restore`, so a rerun never fails on it again).

`body(step)` runs one step (1-based) on `loop.state` and returns a `StepOutput`: metrics to log (or
None), the progress bar's fields, and the step's non-finite flag (a device scalar may be checked
`guard_lag` steps later, so the device stays busy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils

from pro_jax.configs.base import base_config
from pro_jax.train import guards
from pro_jax.train import logging as train_logging
from pro_jax.train.checkpoint import (CHECKPOINTS_DIR, DAMAGED_SUFFIX, Checkpointer, as_path, base_for_fresh_run,
                                     restore_base)
from pro_jax.train.config import config_diff, with_new_defaults
from pro_jax.train.guards import NonFiniteError, TooManySkippedError  # noqa: F401 (re-exported)
from pro_jax.train.profile import StepProfiler
from pro_jax.train.progress import ProgressLog
from pro_jax.train.state import TrainState, init_state, split_variables

log = logging.getLogger("pro_jax")
CONFIG_FILE = "config.json"


class WorkdirError(RuntimeError):
  """The workdir holds another run; pass existing='resume' or 'overwrite', or use another workdir."""


class Preempted(RuntimeError):
  """A run was stopped by SIGTERM after saving a checkpoint: rerun the same command to resume."""


def raise_if_preempted(result: Any, workdir: Any, unit: str = "step") -> None:
  """`Preempted` when a run (`LoopResult`, `TrainResult`, `PPOResult`) stopped at a SIGTERM."""
  if result.status == "preempted":
    raise Preempted(f"{workdir}: preempted at {unit} {result.step}; checkpoint saved; rerun the command to resume")


# ---------------------------------------------------------------------------------------------
# Workdir guard


def check_workdir(workdir: Any) -> None:
  """WorkdirError unless `workdir` is a directory or absent (its local parents too: an object store's
  prefixes cannot be files, and its bucket / scheme roots are no paths to stat)."""
  remote = "://" in str(workdir)
  for p in (workdir,) if remote else (workdir, *workdir.parents):
    if p.exists() and not p.is_dir():
      raise WorkdirError(f"workdir {workdir}: {p} exists and is not a directory")


def read_run_config(cfg_path: Any) -> dict:
  """The JSON dict in a workdir's config.json; WorkdirError naming the file when it is not one."""
  try:
    old = json.loads(cfg_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{cfg_path} is not a valid JSON config ({e}); restore it, or pass --overwrite to "
                       "delete the run in this workdir, or use another workdir") from None
  if not isinstance(old, dict):
    raise WorkdirError(f"{cfg_path}: expected a JSON object, got {type(old).__name__}; restore it, or pass "
                       "--overwrite to delete the run in this workdir")
  return old


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
  check_workdir(workdir)
  has_run = cfg_path.exists() or (ck_dir.is_dir() and any(ck_dir.iterdir()))
  if has_run and existing == "overwrite":
    if jax.process_index() == 0:
      for name in (CHECKPOINTS_DIR, CHECKPOINTS_DIR + DAMAGED_SUFFIX, "base", "tb"):
        if (workdir / name).exists():
          (workdir / name).rmtree()
      for name in (CONFIG_FILE, train_logging.METRICS_FILE):
        if (workdir / name).exists():
          (workdir / name).unlink()
    has_run = False
  if has_run:
    if not cfg_path.exists():
      if existing != "resume":
        raise WorkdirError(f"{workdir} holds checkpoints but no {CONFIG_FILE}; pass --resume to continue "
                           "them with this config, --overwrite to delete them, or use another workdir")
    else:
      old = read_run_config(cfg_path)
      diff = config_diff(with_new_defaults(old, cfg_json), cfg_json)
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


class Preemption:
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
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # noqa: BLE001 (no preemption service)
        return False
    return self.flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class StepOutput:
  """What one step of a run reports: `log` (host metrics for the logger, or None this step), `bar`
  (keyword arguments of `ProgressBar.update`), `nonfinite` (the step's non-finite flag, device or host),
  `eval` (held-out metrics, logged with the prefix `eval/`, or None)."""

  log: dict | None = None
  bar: dict = dataclasses.field(default_factory=dict)
  nonfinite: Any = None
  eval: dict | None = None  # held-out metrics this step (logged under eval/)


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  step: int  # steps completed (== the last checkpoint's step)
  status: str  # "done" | "preempted"
  resumed_from: int | None


def _defaults_json() -> dict:
  """The default config (`base_config()`) as JSON, for the progress header's "config vs defaults"."""
  return json.loads(base_config().to_json())


def _profile_args(cfg: Any) -> dict:
  p = cfg.get("profile") if hasattr(cfg, "get") else None
  return {"start_step": int(p.start_step), "num_steps": int(p.num_steps)} if p is not None else {}


class RunLoop:
  """One run's loop around its step (see the module docstring)."""

  def __init__(self, cfg: Any, workdir: str | os.PathLike, su: Any, *, cfg_json: dict, meta: dict, total: int,
               desc: str, existing: str = "auto", unit: str = "step",
               on_event: Callable[[str, int], None] | None = None):
    self.cfg, self.su, self.meta, self.total, self.desc, self.unit = cfg, su, meta, int(total), desc, unit
    self.cfg_json = cfg_json
    self.event = on_event or (lambda name, step: None)
    self.workdir = as_path(workdir)
    prepare_workdir(self.workdir, cfg_json, existing)
    self.ckpt = Checkpointer(self.workdir / CHECKPOINTS_DIR, keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save)
    self.state: TrainState | None = None
    self.base: Any = None
    self.start = 0
    self.resumed_from: int | None = None

  def restore_or_init(self, init_variables: Callable[[], Any], *, on_restore: Callable[[Any], None] | None = None,
                      donate: bool = True) -> None:
    """`self.state` and `self.base` (the non-trainable variables) from the newest checkpoint, else from
    `init_variables()` (the full variables, sharded; `donate=False` keeps them alive for the caller)."""
    su, cfg = self.su, self.cfg
    if self.ckpt.all_steps():
      restored = self.ckpt.restore(su.abstract_state)
      self.state, self.start = restored.state, restored.step
      if on_restore is not None:
        on_restore(restored)
      base = restore_base(self.workdir, su.base_abstract) if jax.tree.leaves(su.base_abstract) else {}
      if base is None:
        raise FileNotFoundError(f"{self.workdir}/base is missing: cannot resume a {cfg.trainable} run without its "
                                "base variables")
      self.base, self.resumed_from = base, self.start
      log.info("%s: resumed from %s %d (%s)", self.desc, self.unit, self.start, self.ckpt.directory)
      return
    trainable, base = split_variables(init_variables(), cfg.trainable)
    self.base = base_for_fresh_run(self.workdir, base, su.base_abstract)
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    self.state = jax.jit(lambda p, r: init_state(p, su.optimizer, r), out_shardings=su.state_shardings,
                         donate_argnums=(0,) if donate else ())(trainable, rng)
    self.start = 0

  def _check_skipped(self, s: int, max_fraction: float, *, final: bool) -> None:
    """`guards.check_skipped` over the state's updates (PPO: several per iteration; the total is
    extrapolated from the updates per `unit` so far)."""
    skipped, updates = (int(x) for x in jax.device_get((self.state.nonfinite_count, self.state.step)))
    total_updates = updates if final or s <= 0 else round(updates * self.total / s)
    guards.check_skipped(skipped, updates, total_updates, max_fraction, final=final)

  def _check_finite(self, step: int, flag: Any) -> None:
    if float(flag) > 0:
      raise NonFiniteError(f"{self.unit} {step}: non-finite loss, gradient or update (guards.nonfinite='stop'); "
                           "its update was skipped, later steps were not saved")

  def run(self, body: Callable[[int], StepOutput], *,
          checkpoint: Callable[[int], tuple[Any, dict | None, Any]], guard_lag: int = 0) -> LoopResult:
    """Steps `start + 1 .. total` of `body`; `checkpoint(step) -> (data_state, extra, arrays)` is what a
    checkpoint records beside the state. Returns when done or preempted (after the checkpoint)."""
    cfg, total = self.cfg, self.total
    logger = train_logging.MetricsLogger(self.workdir, tensorboard=cfg.log.tensorboard,
                                         wandb_project=cfg.log.wandb_project or None, config=self.cfg_json,
                                         resume_step=self.start)  # drops lines logged after the checkpoint
    bar = train_logging.ProgressBar(total, desc=self.desc, initial=self.start,
                                    disable=None if cfg.log.progress else True)
    progress = ProgressLog(self.desc, total, self.start, every_steps=cfg.log.every_steps,
                           enabled=None if cfg.log.progress else False)  # log lines when stderr is not a TTY
    progress.start(self.workdir, self.cfg_json, _defaults_json(), tensorboard=cfg.log.tensorboard)
    profiler = StepProfiler(self.workdir, **_profile_args(cfg))
    guard = cfg.guards.nonfinite == "stop"
    max_skipped = float(cfg.guards.get("max_skipped_fraction", 0.1))
    pending: list[tuple[int, Any]] = []
    status, step = "done", self.start

    def save(s: int, nonfinite: Any = None):
      guards.check_before_save(self.state, f"{self.unit} {s}", nonfinite, cfg.guards.nonfinite)  # never non-finite
      self.event("save_started", s)
      data_state, extra, arrays = checkpoint(s)
      self.ckpt.save(s, self.state, data_state=data_state, extra=extra, arrays=arrays, meta=self.meta)
      self.event("save_dispatched", s)  # arrays copied to host; files being written in the background
      logger.sync()  # gs:// workdir: the metrics up to this checkpoint reach the bucket with it (a new VM resumes)

    try:
      with Preemption() as preempt:
        for s in range(self.start + 1, total + 1):
          profiler.before_step(s)
          out = body(s)
          step = s
          progress.step_done(s, self.state, tokens=out.bar.get("tokens"))
          profiler.after_step(s, self.state)
          if guard and out.nonfinite is not None:
            pending.append((s, out.nonfinite))
            while len(pending) > guard_lag:
              self._check_finite(*pending.pop(0))
          if out.log is not None:
            logger.log(s, out.log)
            self._check_skipped(s, max_skipped, final=False)
            progress.log(s, out.log, loss=out.bar.get("loss"), extra=out.bar.get("extra"))
          if out.eval:
            logger.log(s, out.eval, prefix="eval")
            progress.write(f"eval at step {s}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.eval.items()))
          bar.update(s, **out.bar)
          stop = preempt.reached(s)
          if s % cfg.checkpoint.every_steps == 0 or s == total or stop:
            save(s, out.nonfinite)
          if stop:
            status = "preempted"
            self.event("preempted", s)
            break
        for s_flag in pending:
          self._check_finite(*s_flag)
      self.ckpt.wait()
      self.event("save_finished", step)
      if status == "done":
        self._check_skipped(step, max_skipped, final=True)
      progress.end(step, status, self.ckpt.directory / str(step) if step > self.start else None)
    finally:
      profiler.close()
      bar.close()
      logger.close()
      self.ckpt.close()
    return LoopResult(state=self.state, step=step, status=status, resumed_from=self.resumed_from)


__all__ = ["RunLoop", "StepOutput", "LoopResult", "Preemption", "prepare_workdir", "WorkdirError",
           "NonFiniteError", "TooManySkippedError", "Preempted", "raise_if_preempted", "CONFIG_FILE"]
