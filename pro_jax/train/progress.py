"""Progress as plain log lines, for runs whose output goes to a file (every TPU launch).

The tqdm bar (`pro_jax.train.logging.ProgressBar`) only draws on a terminal. `ProgressLog` is its
counterpart for a log file: process 0 writes whole lines to stderr (flushed, timestamped), so
`tail -F` (`tpu_scripts/logs.sh`) shows a pod run's progress live:

  2026-12-08 00:10:02 [sft] workdir gs://b/hh/sft
  2026-12-08 00:10:02 [sft] TensorBoard: tensorboard --logdir gs://b/hh/sft/tb
  2026-12-08 00:10:02 [sft] config vs defaults: total_steps: 100 -> 400; optim.lr: 0.0003 -> 1e-05
  2026-12-08 00:10:19 [sft] step 1 compiled and ran in 16.8 s
  2026-12-08 00:10:31 [sft] step 50/400 (12%) loss 2.317 | 4.21 step/s | 34.5k tok/s | MFU 41.2% | elapsed 0:00:29 | ETA 0:01:23
  ...
  2026-12-08 00:12:01 [sft] done: steps 1-400 in 0:01:59 (compile 16.8 s), 3.91 step/s, 1.31M tokens; checkpoint gs://b/hh/sft/checkpoints/400

The ETA leaves out compile time: it divides the steps left by the rate measured since the first
step finished (the loop calls `step_done` for every step; only the first one waits for the device).
step/s and tok/s in a line are over the steps since the previous line; MFU is the engine's figure
(only where the device's peak is known, i.e. on TPUs and listed GPUs; `pro_jax.train.flops.peak_flops`).
The engine and PPO get these lines from the run loop (`pro_jax.train.loop.RunLoop`).
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax

from pro_jax.train.config import config_diff


def _hms(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _human(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def config_vs_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any], limit: int = 40) -> str:
  """`a.b: default -> value; ...` for keys present in both that differ, then `+ sections: x, y` for
  top-level sections the defaults lack (a stage's own sections); "defaults" when nothing differs."""
  common = {k: v for k, v in config.items() if k in defaults}
  diff = [d for d in config_diff(dict(defaults), common) if "(absent)" not in d]
  extra = sorted(k for k in config if k not in defaults)
  parts = diff[:limit] + ([f"... {len(diff) - limit} more"] if len(diff) > limit else [])
  text = "; ".join(parts) if parts else "defaults"
  return text + (f"; + sections: {', '.join(extra)}" if extra else "")


class ProgressLog:
  """Timestamped progress lines on `stream` (default stderr) from process 0 when it is not a TTY.

  Args:
    name: the run's label ("train", "sft", "ppo", ...), shown in brackets.
    total_steps: the run's last step; start_step: the step it resumes from (0 for a fresh run).
    every_steps: write a step line when `step % every_steps == 0` and at the last step.
    tokens_per_step: tokens per step for the totals line when `step_done` is not given them.
    enabled: None = process 0 and `stream` is not a terminal (the bar draws on a terminal).
  """

  def __init__(self, name: str, total_steps: int, start_step: int = 0, *, every_steps: int = 10,
               tokens_per_step: int = 0, enabled: bool | None = None, stream: TextIO | None = None,
               process_index: int | None = None, time_fn: Callable[[], float] = time.perf_counter):
    self.stream = sys.stderr if stream is None else stream
    if enabled is None:
      if process_index is None:
        process_index = jax.process_index()
      isatty = getattr(self.stream, "isatty", None)
      enabled = process_index == 0 and not (callable(isatty) and isatty())
    self.enabled = bool(enabled)
    self.name, self.total, self.start_step = name, int(total_steps), int(start_step)
    self.every_steps = max(int(every_steps), 1)
    self.tokens_per_step = int(tokens_per_step or 0)
    self.time_fn = time_fn
    self.t_start = time_fn()
    self.t_first: float | None = None  # when the first step of this invocation finished
    self.compile_s: float | None = None
    self.last_step = self.start_step
    self.tokens = 0.0  # tokens processed by this invocation (from step_done)
    self._mark = (self.t_start, self.start_step, 0.0)  # (time, step, tokens) of the previous step line
    self.lines: list[str] = []  # what was written (tests, and the caller's own summary)

  def write(self, text: str) -> None:
    if not self.enabled:
      return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    line = f"{stamp} [{self.name}] {text}"
    self.lines.append(line)
    self.stream.write(line + "\n")
    self.stream.flush()

  def start(self, workdir: Any, config: Mapping[str, Any] | None = None,
            defaults: Mapping[str, Any] | None = None, tensorboard: bool = True) -> None:
    """The run's header: workdir (and the resume step), how to watch it, what differs from the defaults."""
    resumed = f" (resuming from step {self.start_step})" if self.start_step else ""
    todo = f"steps {self.start_step + 1}-{self.total}" if self.start_step < self.total else "nothing left to run"
    self.write(f"workdir {workdir}{resumed}; {todo}")
    if tensorboard:
      self.write(f"TensorBoard: tensorboard --logdir {str(workdir).rstrip('/')}/tb")
    if config is not None and defaults is not None:
      self.write("config vs defaults: " + config_vs_defaults(config, defaults))

  def step_done(self, step: int, outputs: Any = None, tokens: float | None = None) -> None:
    """After step `step` is dispatched (`tokens`: tokens it processed). For the first step of this
    invocation it waits for `outputs` (compile + first run), so the ETA can leave compile time out;
    later calls cost nothing."""
    self.last_step = int(step)
    if tokens:
      self.tokens += float(tokens)
    if self.t_first is None and self.enabled:
      if outputs is not None:
        jax.block_until_ready(outputs)
      self.t_first = self.time_fn()
      self.compile_s = self.t_first - self.t_start
      self.write(f"step {step} compiled and ran in {self.compile_s:.1f} s")

  def due(self, step: int) -> bool:
    return self.enabled and (step % self.every_steps == 0 or step == self.total)

  def log(self, step: int, metrics: Mapping[str, Any] | None = None, *, loss: Any = None,
          extra: Mapping[str, Any] | None = None) -> None:
    """A step line at a log step: loss (`loss`, else `metrics["loss"]`), step/s and tok/s since the
    previous line (own clock; the first interval includes compilation), `metrics["mfu"]` when present,
    skipped updates, `extra` figures, elapsed, ETA. Call it once the step's outputs were fetched."""
    if not self.due(step):
      return
    metrics = metrics or {}
    now = self.time_fn()
    mark_t, mark_s, mark_tok = self._mark
    self._mark = (now, step, self.tokens)
    loss = metrics.get("loss") if loss is None else loss
    parts = [f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%)"]
    if loss is not None:
      parts[0] += f" loss {float(loss):.4g}"
    if now > mark_t and step > mark_s:
      parts.append(f"{(step - mark_s) / (now - mark_t):.3g} step/s")
      if self.tokens > mark_tok:
        parts.append(f"{_human((self.tokens - mark_tok) / (now - mark_t))} tok/s")
    if metrics.get("mfu") is not None:
      parts.append(f"MFU {100.0 * float(metrics['mfu']):.1f}%")
    if metrics.get("nonfinite_count"):
      parts.append(f"skipped {int(metrics['nonfinite_count'])}")
    for k, v in (extra or {}).items():
      parts.append(f"{k} {float(v):.4g}")
    parts.append(f"elapsed {_hms(now - self.t_start)}")
    parts.append(f"ETA {self.eta(step, now)}")
    self.write(" | ".join(parts))

  def eta(self, step: int, now: float | None = None) -> str:
    """Time left at the rate since the first step finished (compile excluded); "?" before a rate exists."""
    now = self.time_fn() if now is None else now
    first = self.start_step + 1
    if self.t_first is None or step <= first or now <= self.t_first:
      return "?"
    rate = (step - first) / (now - self.t_first)
    return _hms((self.total - step) / rate)

  def end(self, step: int, status: str = "done", checkpoint: Any = None) -> None:
    """The totals line: steps run, wall time (and compile), rate, tokens, the final checkpoint."""
    now = self.time_fn()
    ran = int(step) - self.start_step
    wall = now - self.t_start
    parts = [f"{status}: steps {self.start_step + 1}-{step} in {_hms(wall)}" if ran > 0 else
             f"{status}: nothing to run (at step {step} of {self.total})"]
    if self.compile_s is not None:
      parts[0] += f" (compile {self.compile_s:.1f} s)"
    if ran > 1 and self.t_first is not None and now > self.t_first:
      parts.append(f"{(ran - 1) / (now - self.t_first):.3g} step/s")
    tokens = self.tokens or ran * self.tokens_per_step
    if ran > 0 and tokens:
      parts.append(f"{_human(tokens)} tokens")
    if checkpoint is not None:
      parts.append(f"checkpoint {checkpoint}")
    self.write(", ".join(parts))
