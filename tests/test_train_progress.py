"""Progress without a terminal (log lines, ETA without compile time) and jax.profiler traces of chosen steps."""

import io
import os
import re
import subprocess
import sys

import pytest

from pro_jax.train.progress import ProgressLog, config_vs_defaults


class _Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_eta_leaves_out_compile_time_and_lines_carry_the_figures():
  clock, out = _Clock(), io.StringIO()
  p = ProgressLog("sft", 100, 0, every_steps=10, stream=out, time_fn=clock)
  assert p.enabled  # a StringIO is not a terminal
  p.start("gs://b/run", {"total_steps": 100, "optim": {"lr": 1e-5}, "sft": {}},
          {"total_steps": 20, "optim": {"lr": 3e-4}})
  clock.t += 30.0  # compile + first step: 30 s
  p.step_done(1, tokens=1000)
  for s in range(2, 11):
    clock.t += 0.5  # then 2 steps/s
    p.step_done(s, tokens=1000)
  p.log(10, {"loss": 2.5, "mfu": 0.412, "nonfinite_count": 0}, extra={"kl": 0.0123})
  p.log(11, {"loss": 2.4})  # not a log step: no line
  for s in range(11, 101):
    clock.t += 0.5
    p.step_done(s, tokens=1000)
  p.log(100, loss=2.0)
  p.end(100, "done", "gs://b/run/checkpoints/100")
  lines = out.getvalue().splitlines()
  assert len(lines) == 7, lines
  assert "[sft] workdir gs://b/run; steps 1-100" in lines[0]
  assert "tensorboard --logdir gs://b/run/tb" in lines[1]
  assert "total_steps: 20 -> 100" in lines[2] and "optim.lr: 0.0003 -> 1e-05" in lines[2]
  assert "+ sections: sft" in lines[2]
  assert "step 1 compiled and ran in 30.0 s" in lines[3]
  step = lines[4]
  # 10 steps in 34.5 s since the start (compile included): 0.29 step/s, 290 tok/s
  assert "step 10/100 (10%) loss 2.5" in step and "| 0.29 step/s | 290 tok/s | MFU 41.2% | kl 0.0123" in step
  assert "elapsed 0:00:34" in step and "skipped" not in step
  # 9 steps in 4.5 s after the first -> 2 step/s -> 90 steps left = 45 s (with compile in: 90 / (10/34.5) = 310 s)
  assert step.endswith("ETA 0:00:45"), step
  assert "step 100/100 (100%) loss 2 | 2 step/s | 2k tok/s" in lines[5] and lines[5].endswith("ETA 0:00:00")
  assert "done: steps 1-100 in 0:01:20 (compile 30.0 s)" in lines[6]
  assert "2 step/s" in lines[6] and "100k tokens" in lines[6] and "checkpoint gs://b/run/checkpoints/100" in lines[6]


def test_progress_lines_off_on_a_terminal_and_on_other_processes():
  class Tty(io.StringIO):
    def isatty(self):
      return True

  assert not ProgressLog("x", 10, stream=Tty(), process_index=0).enabled
  assert not ProgressLog("x", 10, stream=io.StringIO(), process_index=1).enabled
  assert ProgressLog("x", 10, stream=io.StringIO(), process_index=0).enabled


def test_config_vs_defaults_lists_changed_keys_only():
  assert config_vs_defaults({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}) == "defaults"
  assert config_vs_defaults({"a": 1, "b": {"c": 3}}, {"a": 1, "b": {"c": 2}}) == "b.c: 2 -> 3"


def _env():
  return {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
          "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
def test_train_command_writes_progress_lines_to_a_log_file_and_a_profile(tmp_path):
  """`pro-jax train` with stderr to a file: header, one line per log.every_steps, ETA, totals; and a
  jax.profiler trace of exactly steps 4-5 in WORKDIR/profile (the layout TensorBoard / XProf read)."""
  wd = tmp_path / "run"
  log_path = tmp_path / "run.log"
  with open(log_path, "w") as f:
    r = subprocess.run([sys.executable, "-m", "pro_jax.cli", "train", "--config", "tiny_lm", "--workdir", str(wd),
                        "--config.total_steps=12", "--config.log.every_steps=4",
                        "--config.profile.start_step=4", "--config.profile.num_steps=2"],
                       stdout=subprocess.PIPE, stderr=f, text=True, env=_env(), timeout=300)
  text = log_path.read_text()
  assert r.returncode == 0, text[-3000:]
  lines = [line for line in text.splitlines() if "[lm]" in line]
  assert f"workdir {wd}" in lines[0]
  assert any("config vs defaults:" in line and "total_steps: 100 -> 12" in line for line in lines)
  steps = [int(m.group(1)) for line in lines for m in [re.search(r"step (\d+)/12 ", line)] if m]
  assert steps == [4, 8, 12]
  step_lines = [line for line in lines if re.search(r"step \d+/12 ", line)]
  assert all(re.search(r"loss [\d.]+ \| [\d.e+-]+ step/s \| [\d.]+k? tok/s \| elapsed \d+:\d\d:\d\d \| ETA ", line)
             for line in step_lines), step_lines
  assert step_lines[-1].endswith("ETA 0:00:00")
  assert re.search(rf"done: steps 1-12 in .*checkpoint {re.escape(str(wd))}/checkpoints/12", lines[-1])

  from pro_jax.train.profile import trace_files

  traces = trace_files(wd / "profile")
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert _step_executions(traces[0]) == 2  # steps 4 and 5, nothing else


def _step_executions(xplane: str) -> int:
  """Executions of the compiled train step (`jit_step`) in the trace saved next to `xplane`."""
  import gzip
  import json

  from etils import epath

  trace = epath.Path(xplane.replace(".xplane.pb", ".trace.json.gz"))
  events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
  return sum(1 for e in events if e.get("name") == "CommonPjRtLoadedExecutable::Execute (jit_step)")
