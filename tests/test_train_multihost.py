"""Two processes (2 CPU devices each, jax.distributed over localhost) train as one 4-device run: each
host feeds only its rows of the global batch; checkpoints are written jointly; the result equals a
single process with 4 devices."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from pro_jax.train.checkpoint import load_checkpoint

DRIVER = textwrap.dedent("""
    import os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from pro_jax import sharding as shd
    from pro_jax.configs import load_config
    workdir, nproc, pid, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = load_config("tiny_lm", sys.argv[5:])
    if nproc > 1:
      assert shd.initialize_distributed("always", f"localhost:{port}", nproc, pid)
    from pro_jax.train.tasks import build_task
    from pro_jax.train.trainer import train
    task = build_task(cfg)
    fed = []
    make_data = task.make_data
    def spy(rows):
      fed.append(rows)
      return make_data(rows)
    task.make_data = spy
    r = train(cfg, workdir, task)
    print(f"RESULT {jax.process_index()} {jax.process_count()} {jax.device_count()} {fed[0]} {r.step}", flush=True)
""")

OVERRIDES = ["--config.total_steps=4", "--config.checkpoint.every_steps=2", "--config.log.tensorboard=false",
             "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  port = _free_port()

  def env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")

  procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "multi"), "2", str(i), str(port), *OVERRIDES],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(2)) for i in range(2)]
  single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "1", "0", "0", *OVERRIDES],
                          capture_output=True, text=True, env=env(4), timeout=600)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert single.returncode == 0, single.stderr[-3000:]
  results = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
  assert results == ["RESULT 0 2 4 slice(0, 4, None) 4", "RESULT 1 2 4 slice(4, 8, None) 4"]  # half each
  assert "RESULT 0 1 4 slice(0, 8, None) 4" in single.stdout

  multi, one = load_checkpoint(tmp_path / "multi"), load_checkpoint(tmp_path / "single")
  assert multi.step == one.step == 4
  for a, b in zip(jax.tree.leaves(multi.variables), jax.tree.leaves(one.variables)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  assert (tmp_path / "multi" / "metrics.jsonl").exists()  # written by process 0 only
