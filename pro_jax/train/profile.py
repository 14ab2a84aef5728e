"""A `jax.profiler` trace of chosen training steps: `--config.profile.start_step=S --config.profile.num_steps=N`.

Process 0 traces steps S .. S+N-1 (the trace starts before step S is dispatched and stops after
step S+N-1's outputs are ready, so the device work of exactly those steps is inside) into
`WORKDIR/profile/plugins/profile/<timestamp>/` (`*.xplane.pb`), the layout TensorBoard's profile
plugin and XProf read:

  pip install 'pro-jax[viz]'
  tensorboard --logdir WORKDIR/profile     # then the PROFILE tab
  xprof --logdir WORKDIR/profile --port 8791

For a `gs://` workdir the trace is written to a local folder first (the profiler writes plain
files) and copied to the workdir with `etils.epath` when it stops. Step 0 / num_steps 0: off.
Profiling the first step also profiles its compilation; start at step 2 or later to see steady steps.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import jax
from etils import epath

log = logging.getLogger("pro_jax")
PROFILE_DIR = "profile"


class StepProfiler:
  """Start / stop a `jax.profiler` trace around steps [start_step, start_step + num_steps)."""

  def __init__(self, workdir: Any, start_step: int = 0, num_steps: int = 0, *, process_index: int | None = None,
               local_dir: str | None = None):
    self.workdir = str(workdir)
    self.first = int(start_step)
    self.last = int(start_step) + int(num_steps) - 1
    pidx = jax.process_index() if process_index is None else int(process_index)
    self.enabled = pidx == 0 and int(start_step) > 0 and int(num_steps) > 0
    self.remote = "://" in self.workdir
    if local_dir is None:
      local_dir = (Path(tempfile.mkdtemp(prefix="pro_jax_profile_")) if self.remote else
                   Path(self.workdir) / PROFILE_DIR)
    self.local_dir = Path(local_dir)
    self.active = False
    self.done = False

  def before_step(self, step: int) -> None:
    """Start the trace when `step` is the first profiled step (or a resumed run starts inside the window)."""
    if not self.enabled or self.active or self.done or not (self.first <= step <= self.last):
      return
    self.local_dir.mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(self.local_dir))
    self.active = True
    log.info("profiling steps %d-%d into %s/%s", step, self.last, self.workdir.rstrip("/"), PROFILE_DIR)

  def after_step(self, step: int, outputs: Any) -> None:
    """Stop the trace once the last profiled step's `outputs` are ready."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active, self.done = False, True
    if self.remote:
      self._upload()
    log.info("profile written to %s/%s (tensorboard --logdir %s/%s)", self.workdir.rstrip("/"), PROFILE_DIR,
             self.workdir.rstrip("/"), PROFILE_DIR)

  def _upload(self) -> None:
    dst_root = epath.Path(self.workdir) / PROFILE_DIR
    try:
      for path in sorted(self.local_dir.rglob("*")):
        if path.is_file():
          dst = dst_root / path.relative_to(self.local_dir).as_posix()
          dst.parent.mkdir(parents=True, exist_ok=True)
          dst.write_bytes(path.read_bytes())
    except Exception as e:  # noqa: BLE001 (a failed copy must not stop training)
      log.warning("could not copy the profile to %s: %s (it stays in %s)", dst_root, e, self.local_dir)

  def close(self) -> None:
    """Stop a trace still running (the run ended or failed inside the window)."""
    self.stop()


def trace_files(directory: Any) -> list[str]:
  """The `*.xplane.pb` files under `directory`/plugins/profile (local or gs://), as strings."""
  root = epath.Path(directory) / "plugins" / "profile"
  if not root.exists():
    return []
  return sorted(str(p) for p in root.glob("*/*.xplane.pb"))


__all__ = ["PROFILE_DIR", "StepProfiler", "trace_files"]
