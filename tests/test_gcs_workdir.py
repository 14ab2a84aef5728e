"""gs:// workdirs end to end against a real GCS JSON-API server (tests/gcs_emulator.py): a run killed
with SIGKILL resumes from the bucket, its logs and checkpoints live only in the bucket, and nothing
appears on local disk under the working directory."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(emulator, tmp_path):
  env = dict(os.environ, **emulator.env(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["TMPDIR"] = str(tmp_path / "tmp")  # the logger's local mirror; checked to be only a mirror below
  os.makedirs(env["TMPDIR"], exist_ok=True)
  return env


def _files_under(path):
  return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def _wait_for_line(log_path, pattern, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    text = log_path.read_text() if log_path.exists() else ""
    if re.search(pattern, text):
      return text
    if proc.poll() is not None:
      raise AssertionError(f"exited ({proc.returncode}) before {pattern!r}:\n{text[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"no {pattern!r} within {timeout} s")


@pytest.mark.slow
def test_engine_run_on_gs_killed_and_resumed(gcs_bucket, gcs_emulator, tmp_path):
  """`pro-jax train --workdir gs://...`: SIGKILL after step 15, rerun resumes from the newest
  checkpoint in the bucket and finishes; metrics.jsonl in the bucket has every step once; the cwd
  stays empty; load_checkpoint reads the result from gs://."""
  workdir = f"{gcs_bucket}/runs/lm"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = _env(gcs_emulator, tmp_path)
  cmd = [sys.executable, "-m", "pro_jax.cli", "train", "--config", "tiny_lm", "--workdir", workdir,
         "--config.total_steps=30", "--config.checkpoint.every_steps=5", "--config.log.every_steps=5",
         "--config.mesh.fsdp=2", "--config.mesh.data=1"]
  log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
  with open(log1, "w") as f:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
      _wait_for_line(log1, r"\[lm\] step 15/30", proc)
      time.sleep(1.0)  # let an async save of a checkpoint be in flight
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  bucket = gcs_bucket.removeprefix("gs://")
  names = gcs_emulator.list_objects(bucket, "runs/lm/")
  assert "runs/lm/config.json" in names and any(n.startswith("runs/lm/checkpoints/") for n in names)

  with open(log2, "w") as f:
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
  text = log2.read_text()
  assert r.returncode == 0, text[-3000:]
  m = re.search(r"\[lm\] workdir gs://\S+ \(resuming from step (\d+)\)", text)
  assert m and int(m.group(1)) in (5, 10, 15, 20), text[-3000:]
  resumed = int(m.group(1))
  assert f"done: steps {resumed + 1}-30" in text and f"checkpoint {workdir}/checkpoints/30" in text

  from etils import epath

  from pro_jax.train.checkpoint import load_checkpoint

  logged = [json.loads(line)["step"] for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert logged == [5, 10, 15, 20, 25, 30]
  assert list((epath.Path(workdir) / "tb").glob("events.out.tfevents.*"))
  loaded = load_checkpoint(workdir)
  assert loaded.step == 30 and loaded.model_config.d_model == 32
  assert _files_under(cwd) == []  # nothing written under the working directory
  assert not (cwd / "gs:").exists()
  # the only local files are the metrics logger's mirror (under TMPDIR), identical to the bucket's copy
  local = tmp_path / "tmp" / "pro_jax_logs"
  mirrored = [p for p in _files_under(local) if p.endswith("metrics.jsonl")]
  assert len(mirrored) == 1
  assert (local / mirrored[0]).read_text() == (epath.Path(workdir) / "metrics.jsonl").read_text()
