"""A PRO stage as 2 processes (jax.distributed over localhost, 2 CPU devices each) on one gs:// workdir
served by the GCS emulator: both processes train one 4-device run and report the same held-out
result; the shared files (tokenizers, config, metrics, held-out report, checkpoint metadata) are
written by process 0 only (the rm run records the task tokenizer W/tokenizer), while each process writes its own array shards into the one checkpoint."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `pro-jax rm ...`; records every file write that pro_jax code (not Orbax, which coordinates its
# own per-process files) makes through etils.epath, and prints them with the command's output.
DRIVER = textwrap.dedent("""
    import json, sys, traceback
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from etils import epath
    writes = []
    def spy(name):
      original = getattr(epath.gpath.PosixGPath, name)
      def wrapped(self, *a, **k):
        stack = [f.filename for f in traceback.extract_stack()[:-1]]
        if any("/pro_jax/" in f for f in stack) and not any("/orbax/" in f for f in stack):
          writes.append(f"{name} {self}")
        return original(self, *a, **k)
      setattr(epath.gpath.PosixGPath, name, wrapped)
    for name in ("write_bytes", "write_text", "mkdir", "rename", "replace", "unlink", "rmtree", "touch"):
      spy(name)
    from pro_jax.cli import main
    rc = main(sys.argv[1:])
    print("WRITES " + json.dumps(sorted(set(writes))), flush=True)
    print(f"PROCESS {jax.process_index()} {jax.process_count()} {jax.device_count()} rc={rc}", flush=True)
    sys.exit(rc)
""")

TINY = ["--config.task.n_train=48", "--config.task.n_eval=16", "--config.model.d_model=32", "--config.model.mlp_dim=64",
        "--config.model.n_layers=1", "--config.rm.pro.source=scratch", "--config.rm.total_steps=4",
        "--config.rm.batch_size=8", "--config.rm.optim.warmup_steps=1", "--config.rm.checkpoint.every_steps=2",
        "--config.rm.log.every_steps=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_rm_stage_as_two_processes_on_one_gs_workdir(gcs_bucket, gcs_emulator, tmp_path):
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  workdir = f"{gcs_bucket}/hh"
  port = _free_port()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = dict(os.environ, **gcs_emulator.env(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen([sys.executable, str(script), "rm", "--config", "demo", "--workdir", workdir, *TINY,
                             "--config.distributed.initialize=always",
                             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = _wait_all(procs, timeout=600)
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, (out[-2000:], err[-3000:])

  def parsed(out):
    held = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    writes = json.loads(next(line for line in out.splitlines() if line.startswith("WRITES "))[7:])
    proc = next(line for line in out.splitlines() if line.startswith("PROCESS "))
    return held, writes, proc

  (held0, writes0, proc0), (held1, writes1, proc1) = parsed(outs[0][0]), parsed(outs[1][0])
  assert proc0 == "PROCESS 0 2 4 rc=0" and proc1 == "PROCESS 1 2 4 rc=0"  # one 4-device run
  assert len(held0) == 1 and held0 == held1  # both processes computed the same held-out accuracy
  assert held0[0]["count"] and set(held0[0]["accuracy"]) == {"concise", "informative", "harmless"}

  assert writes1 == [], writes1  # process 1 wrote no shared file
  written0 = " ".join(writes0)
  for shared in ("hh/tokenizer/tokenizer.json", "hh/rm/config.json",
                 "hh/rm/heldout.json", "hh/rm/metrics.jsonl"):
    assert shared in written0, (shared, writes0)

  bucket = gcs_bucket.removeprefix("gs://")
  names = gcs_emulator.list_objects(bucket, "hh/")
  assert "hh/rm/checkpoints/4/commit_success.txt" in names
  # one checkpoint, written jointly: each process's shards in its own OCDBT sub-database
  assert any("/ocdbt.process_0/" in n for n in names) and any("/ocdbt.process_1/" in n for n in names)
  assert json.loads(_read(gcs_bucket, "hh/rm/heldout.json")) == held0[0]
  assert os.listdir(cwd) == []


def _wait_all(procs, timeout):
  """Both outputs; when one process fails the other (stuck in a collective) is killed, not waited for."""
  import threading
  import time

  outs = [None] * len(procs)
  threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, procs[i].communicate()), daemon=True)
             for i in range(len(procs))]
  for t in threads:
    t.start()
  t0 = time.time()
  while any(p.poll() is None for p in procs) and time.time() - t0 < timeout:
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
  for t in threads:
    t.join(30)
  return [o or ("", "") for o in outs]


def _read(bucket_url, name):
  from etils import epath

  return (epath.Path(bucket_url) / name).read_text()
