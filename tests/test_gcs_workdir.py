"""gs:// workdirs end to end against a real GCS JSON-API server (tests/gcs_emulator.py): the PRO
pipeline killed with SIGKILL resumes from the bucket, its files live only in the bucket, and nothing
appears on local disk under the working directory."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
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


TINY = ["--config.task.n_train=64", "--config.task.n_eval=16", "--config.model.d_model=32",
        "--config.model.mlp_dim=64", "--config.model.n_layers=1", "--config.scorers=rm",
        "--config.eval.max_new_tokens=6", "--config.eval.batch_size=16", "--config.eval.grid_step=0.5"]
for _stage, _steps in (("sft", 4), ("rm", 4), ("adapter", 4), ("policy", 8)):
  TINY += [f"--config.{_stage}.total_steps={_steps}", f"--config.{_stage}.batch_size=8",
           f"--config.{_stage}.optim.warmup_steps=1", f"--config.{_stage}.log.every_steps=2",
           f"--config.{_stage}.checkpoint.every_steps=2"]


@pytest.mark.slow
def test_pro_pipeline_on_gs_killed_mid_stage_resumes_and_finishes(gcs_bucket, gcs_emulator, tmp_path):
  """`pro-jax demo --workdir gs://...` (sft, rm, adapter, policy, eval on the embedded task): SIGKILL in
  the policy stage once its step-2 checkpoint is committed in the bucket; the rerun reuses the finished
  stages, resumes the policy from the bucket and finishes; then load_checkpoint / load_adapter /
  load_reward_model read the results from gs://. Nothing is written under the working directory."""
  bucket = gcs_bucket.removeprefix("gs://")
  workdir = f"{gcs_bucket}/hh"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = _env(gcs_emulator, tmp_path)
  cmd = [sys.executable, "-m", "pro_jax.cli", "demo", "--config", "demo", "--workdir", workdir, *TINY]
  log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
  with open(log1, "w") as f:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
      _wait_for_line(log1, r"\[policy\] step 1 compiled", proc, timeout=600)
      t0 = time.time()
      while "hh/policy/checkpoints/2/commit_success.txt" not in gcs_emulator.list_objects(bucket, "hh/policy/"):
        assert time.time() - t0 < 120 and proc.poll() is None, log1.read_text()[-3000:]
        time.sleep(0.05)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  names = gcs_emulator.list_objects(bucket, "hh/")
  assert "hh/policy/checkpoints/8/commit_success.txt" not in names  # killed mid-stage
  assert "hh/report/report.json" not in names

  with open(log2, "w") as f:
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
  text = log2.read_text()
  assert r.returncode == 0, text[-3000:]
  for stage, steps in (("sft", 4), ("reward_model", 4), ("adapter", 4)):  # finished before the kill: not rerun
    assert f"[{stage}] done: nothing to run (at step {steps} of {steps})" in text, stage
  m = re.search(r"\[policy\] workdir gs://\S+/hh/policy \(resuming from step (\d+)\); steps \d+-8", text)
  assert m and int(m.group(1)) in (2, 4, 6), text[-3000:]
  assert f"[policy] done: steps {int(m.group(1)) + 1}-8" in text

  from etils import epath

  import pro_jax

  w = epath.Path(workdir)
  report = json.loads((w / "report" / "report.json").read_text())
  assert report["objectives"] == ["concise", "informative", "harmless"] and "PRO" in report["settings"]
  assert (w / "report" / "front.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((w / "norm.json").read_text())["objectives"] == report["objectives"]
  assert (w / "scores.sqlite").read_bytes()[:16] == b"SQLite format 3\x00"
  assert (w / "tokenizer" / "tokenizer.json").exists()  # the task's tokenizer, which the rm run records
  logged = [json.loads(line)["step"] for line in (w / "policy" / "metrics.jsonl").read_text().splitlines()]
  assert logged == [2, 4, 6, 8]  # every log step once, across the kill

  policy = pro_jax.load_checkpoint(f"{workdir}/policy")
  assert policy.step == 8 and policy.model_config.d_model == 32
  adapter = pro_jax.load_adapter(f"{workdir}/adapter")
  weights = adapter(["what color is the zorb ?", "how do i poison the zorb ?"])
  assert weights.shape == (2, 3) and np.allclose(weights.sum(1), 1.0, atol=1e-5)
  rm = pro_jax.load_reward_model(f"{workdir}/rm")
  scores = np.asarray(rm.score(["what color is the zorb ?"], ["the zorb is blue ."]))
  assert scores.shape == (1, 3) and np.isfinite(scores).all()
  assert _files_under(cwd) == []  # nothing under the working directory
