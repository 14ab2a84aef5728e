"""Training logs: a JSONL metrics file, TensorBoard, Weights & Biases and a progress bar (FLOPs and
MFU: `pro_jax.train.flops`).

`MetricsLogger` always appends one JSON object per `log()` call to `workdir/metrics.jsonl`
(flushed line by line), writes TensorBoard event files under `workdir/tb/` with tensorboardX (no
TensorFlow) and, when asked, logs to Weights & Biases. Only process 0 writes on multi-host runs.

A line of `metrics.jsonl` looks like

  {"step": 100, "time": 1767225600.25, "train/loss": 2.31, "train/grad_norm": "nan"}

keys are `<prefix>/<name>` (the TensorBoard tags); non-finite floats are written as the strings
"nan", "inf", "-inf" so every line is valid JSON (`read_metrics` turns them back into floats).

Remote workdirs (`gs://...`): files cannot be appended to on GCS, so the logger writes into a local
mirror directory and copies `metrics.jsonl` and the event files to the workdir every
`sync_interval_s` seconds and on `close()` (with `etils.epath`; a failed copy warns, it never stops
training).
"""

from __future__ import annotations

import json
import logging as _pylogging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_log = _pylogging.getLogger("pro_jax")

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
WANDB_ID_FILE = "wandb_run_id.txt"


def _is_remote(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def _default_process_index() -> int:
  import jax  # lazy: keeps `import pro_jax.train.logging` cheap

  return jax.process_index()


# ---------------------------------------------------------------------------------------------
# Value conversion


def _to_python_scalar(key: str, value: Any) -> int | float:
  """A Python int/float from a Python, numpy or (already fetched) jax scalar; errors name the key."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return value
  try:
    arr = np.asarray(value)
  except Exception as e:  # noqa: BLE001
    raise TypeError(f"metric {key!r}: cannot convert {type(value).__name__} to a number") from e
  if arr.size != 1:
    raise ValueError(f"metric {key!r} has shape {arr.shape}; log scalars (reduce it first)")
  arr = arr.reshape(())
  if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
    return int(arr)
  if np.issubdtype(arr.dtype, np.floating):
    return float(arr)
  raise TypeError(f"metric {key!r}: dtype {arr.dtype} is not a number")


def _json_value(value: int | float) -> int | float | str:
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` file (a file or a workdir), non-finite strings as floats.

  A final line cut short by a crash is skipped; a malformed line elsewhere raises naming its line.
  """
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  lines = path.read_text().splitlines()
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        continue  # torn last line (the process died mid-write)
      raise ValueError(f"{path}: line {i + 1} is not valid JSON: {e}") from e
    records.append({k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in rec.items()})
  return records


def _truncate_jsonl(path: Path, resume_step: int) -> int:
  """Drop lines with step > resume_step (and torn lines) from a metrics file; returns lines dropped."""
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      step = int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
      dropped += 1
      continue
    if step <= resume_step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
  return dropped


def _jsonable(obj: Any) -> Any:
  """A JSON-serializable copy of a config (ConfigDict, dataclass, dict...); unknowns become str."""
  if hasattr(obj, "to_dict") and callable(obj.to_dict):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (str, int, float, bool)) or obj is None:
    return obj
  try:
    import dataclasses

    if dataclasses.is_dataclass(obj):
      return _jsonable(dataclasses.asdict(obj))
  except TypeError:
    pass
  return str(obj)


# ---------------------------------------------------------------------------------------------
# MetricsLogger


class MetricsLogger:
  """Writes scalar metrics to `workdir/metrics.jsonl`, TensorBoard (`workdir/tb/`) and W&B.

  Args:
    workdir: run directory (local path or `gs://...`).
    tensorboard: write TensorBoard event files with tensorboardX.
    wandb_project: log to this Weights & Biases project (needs `pip install 'pro-jax[wandb]'`).
    config: run configuration (ConfigDict / dict / dataclass): sent to W&B and to TensorBoard as text.
    process_index: this host's index; default `jax.process_index()`. Only process 0 writes.
    resume_step: the step the run resumed from. Lines with `step > resume_step` (logged after the
      checkpoint by the interrupted run, and about to be logged again) are removed from
      `metrics.jsonl`, TensorBoard is told to purge events after it, and W&B resumes the same run.
      None: append to whatever is there.
    local_dir: where files are written when `workdir` is remote (default: a folder under the
      system temp dir named after the workdir).
    sync_interval_s: for a remote workdir, copy the files there at most this often (and on close).
    wandb_run_name: optional W&B display name.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               wandb_project: str | None = None, config: Any = None,
               process_index: int | None = None, resume_step: int | None = None,
               local_dir: str | os.PathLike | None = None, sync_interval_s: float = 60.0,
               wandb_run_name: str | None = None):
    if resume_step is not None and (not isinstance(resume_step, (int, np.integer)) or resume_step < 0):
      raise ValueError(f"MetricsLogger: resume_step must be a non-negative int, got {resume_step!r}")
    self.workdir = str(workdir)
    self.process_index = _default_process_index() if process_index is None else int(process_index)
    self.active = self.process_index == 0
    self.remote = _is_remote(self.workdir)
    self.sync_interval_s = float(sync_interval_s)
    self._file = None
    self._tb = None
    self._wandb_run = None
    self._closed = False
    self._last_sync = time.monotonic()
    if not self.active:
      self.local_dir = None
      return

    wandb = None
    if wandb_project:  # fail on a missing optional dependency before writing anything
      try:
        import wandb  # type: ignore[import-not-found]
      except ImportError as e:
        raise ImportError(f"MetricsLogger(wandb_project={wandb_project!r}) needs Weights & Biases: "
                          "pip install 'pro-jax[wandb]'") from e

    if self.remote:
      if local_dir is None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.workdir).strip("_")
        local_dir = Path(tempfile.gettempdir()) / "pro_jax_logs" / safe
      self.local_dir = Path(local_dir)
      self.local_dir.mkdir(parents=True, exist_ok=True)
      self._download(METRICS_FILE)
      self._download(WANDB_ID_FILE)
    else:
      self.local_dir = Path(self.workdir)
      self.local_dir.mkdir(parents=True, exist_ok=True)

    self.metrics_path = self.local_dir / METRICS_FILE
    if resume_step is not None:
      dropped = _truncate_jsonl(self.metrics_path, int(resume_step))
      if dropped:
        _log.info("metrics.jsonl: dropped %d line(s) after resumed step %d", dropped, resume_step)
    self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115

    cfg = _jsonable(config) if config is not None else None
    if tensorboard:
      from tensorboardX import SummaryWriter

      purge = None if resume_step is None else int(resume_step) + 1
      self._tb = SummaryWriter(str(self.local_dir / TB_DIR), purge_step=purge, flush_secs=30)
      if cfg is not None and resume_step is None:
        self._tb.add_text("config", "```\n" + json.dumps(cfg, indent=2, sort_keys=True) + "\n```", 0)

    if wandb is not None:
      id_path = self.local_dir / WANDB_ID_FILE
      run_id = id_path.read_text().strip() if id_path.exists() else wandb.util.generate_id()
      self._wandb_run = wandb.init(project=wandb_project, config=cfg, id=run_id, resume="allow",
                                   name=wandb_run_name, dir=str(self.local_dir))
      if not id_path.exists():
        id_path.write_text(run_id + "\n")
    if self.remote:
      self.sync()

  # -- remote mirror ---------------------------------------------------------------------------

  def _remote_path(self, rel: str):
    from etils import epath

    return epath.Path(self.workdir) / rel

  def _download(self, rel: str) -> None:
    try:
      src = self._remote_path(rel)
      if src.exists():
        (self.local_dir / rel).write_bytes(src.read_bytes())
    except Exception as e:  # noqa: BLE001
      _log.warning("could not read %s/%s: %s", self.workdir, rel, e)

  def sync(self) -> None:
    """Copy the local files to a remote workdir (no-op for a local one)."""
    if not (self.active and self.remote):
      return
    self._last_sync = time.monotonic()
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    try:
      for path in sorted(self.local_dir.rglob("*")):
        if not path.is_file() or path.name.endswith(".tmp"):
          continue
        rel = path.relative_to(self.local_dir).as_posix()
        if rel.split("/")[0] == "wandb":  # W&B keeps its own copy
          continue
        dst = self._remote_path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(path.read_bytes())
    except Exception as e:  # noqa: BLE001
      _log.warning("could not copy logs to %s: %s", self.workdir, e)

  # -- logging ---------------------------------------------------------------------------------

  def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
    """Record scalar `metrics` at `step` (one JSONL line; TensorBoard scalars; W&B)."""
    if self._closed:
      raise RuntimeError("MetricsLogger.log() after close()")
    if not self.active:
      return
    if not metrics:
      return
    import jax

    host = jax.device_get(dict(metrics))  # one transfer for all device scalars
    step = int(step)
    tags = {}
    for key, value in host.items():
      if not isinstance(key, str):
        raise TypeError(f"metric names must be str, got {key!r}")
      tags[f"{prefix}/{key}" if prefix else key] = _to_python_scalar(key, value)

    record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
    for tag, value in tags.items():
      record[tag] = _json_value(value)
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()

    if self._tb is not None:
      for tag, value in tags.items():
        self._tb.add_scalar(tag, float(value), global_step=step)
    if self._wandb_run is not None:
      self._wandb_run.log(tags, step=step)
    if self.remote and time.monotonic() - self._last_sync >= self.sync_interval_s:
      self.sync()

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._closed:
      return
    if self.active:
      self.flush()
      if self.remote:
        self.sync()
      if self._tb is not None:
        self._tb.close()
      if self._file is not None:
        self._file.close()
      if self._wandb_run is not None:
        self._wandb_run.finish()
    self._closed = True

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------
# Progress bar


class ProgressBar:
  """A tqdm bar for the training loop showing step/s, tokens/s and the loss.

  `update(step, loss, tokens)` is cheap: the bar position is handed to tqdm (which redraws at most
  every `mininterval`), and the rates / postfix are recomputed at most every `min_interval_s`
  seconds from the steps and tokens accumulated since the last recomputation and the wall time.

  Args:
    total_steps: the bar's total.
    desc: label.
    initial: the step the loop starts from (on resume).
    disable: None = automatic (off unless `file` is a TTY and this is process 0); True / False force.
    file: stream to draw on (default sys.stderr).
    time_fn: clock in seconds (injectable for tests).
    min_interval_s: minimum seconds between rate / postfix updates.
    process_index: default `jax.process_index()`.
  """

  def __init__(self, total_steps: int, desc: str = "train", initial: int = 0,
               disable: bool | None = None, *, file=None, time_fn: Callable[[], float] = time.perf_counter,
               min_interval_s: float = 0.5, process_index: int | None = None):
    self.file = sys.stderr if file is None else file
    self.time_fn = time_fn
    self.min_interval_s = float(min_interval_s)
    if disable is None:
      pidx = _default_process_index() if process_index is None else int(process_index)
      isatty = getattr(self.file, "isatty", None)
      disable = pidx != 0 or not (callable(isatty) and isatty())
    self.disabled = bool(disable)
    self.step = int(initial)
    self.steps_per_s: float | None = None
    self.tokens_per_s: float | None = None
    self.loss: float | None = None
    self._mark_time = self.time_fn()
    self._mark_step = int(initial)
    self._tokens = 0.0
    self._saw_tokens = False
    self._pending_loss: Any = None
    self._extra: dict[str, Any] | None = None
    self._bar = None
    if not self.disabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total_steps, desc=desc, initial=initial, file=self.file,
                       dynamic_ncols=True, unit="step", smoothing=0.1)

  def update(self, step: int, loss: Any = None, tokens: float | None = None,
             extra: Mapping[str, Any] | None = None) -> None:
    """Move to `step`; `tokens` = tokens processed since the previous update; `loss` a scalar.

    The latest `loss` / `extra` given are kept (unconverted: a device array is only fetched when
    the postfix is recomputed), so they show even when given between two recomputations.
    """
    step = int(step)
    if tokens is not None:
      self._tokens += float(tokens)
      self._saw_tokens = True
    if loss is not None:
      self._pending_loss = loss
    if extra is not None:
      self._extra = dict(extra)
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)
    self.step = step
    now = self.time_fn()
    elapsed = now - self._mark_time
    if elapsed < self.min_interval_s or elapsed <= 0:
      return
    self.steps_per_s = (step - self._mark_step) / elapsed
    self.tokens_per_s = self._tokens / elapsed if self._saw_tokens else None
    if self._pending_loss is not None:
      self.loss = float(np.asarray(self._pending_loss))
      self._pending_loss = None
    self._mark_time, self._mark_step, self._tokens = now, step, 0.0
    if self._bar is not None:
      self._bar.set_postfix_str(self.postfix(self._extra), refresh=False)

  def postfix(self, extra: Mapping[str, Any] | None = None) -> str:
    """The text after the bar: `loss=... step/s=... tok/s=...` plus `extra`."""
    parts = []
    if self.loss is not None:
      parts.append(f"loss={self.loss:.4g}")
    if self.steps_per_s is not None:
      parts.append(f"step/s={self.steps_per_s:.3g}")
    if self.tokens_per_s is not None:
      parts.append(f"tok/s={_human(self.tokens_per_s)}")
    for k, v in (extra or {}).items():
      try:
        parts.append(f"{k}={float(np.asarray(v)):.4g}")
      except (TypeError, ValueError):
        parts.append(f"{k}={v}")
    return " ".join(parts)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _human(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"
