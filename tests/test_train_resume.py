"""Exact resume after SIGKILL (mid-step, mid-save, at an arbitrary moment) and SIGTERM; workdir guards;
the non-finite guard inside the training loop."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pro_jax.configs import ConfigError, load_config
from pro_jax.train.checkpoint import Checkpointer
from pro_jax.train.tasks import build_task
from pro_jax.train.config import config_to_dict
from pro_jax.train.trainer import NonFiniteError, WorkdirError, prepare_workdir, train

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, jax
    from pro_jax.configs import load_config
    from pro_jax.train.tasks import build_task
    from pro_jax.train.trainer import train
    workdir, kill = sys.argv[1], sys.argv[2]
    cfg = load_config("tiny_lm", sys.argv[3:])
    kind, _, at = kill.partition(":")
    def on_event(name, step):
      print(f"EVENT {name} {step}", flush=True)
      if name == kind and step == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
    r = train(cfg, workdir, build_task(cfg), on_event=on_event)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(r.state.params))
    np.savez(os.path.join(workdir, "final.npz"), **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    print(f"RESULT {r.status} {r.step}", flush=True)
    sys.exit(75 if r.status == "preempted" else 0)
""")

OVERRIDES = ["--config.total_steps=12", "--config.checkpoint.every_steps=3", "--config.checkpoint.keep=2",
             "--config.log.every_steps=1", "--config.log.tensorboard=false"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
  d = tmp_path_factory.mktemp("driver")
  (d / "driver.py").write_text(DRIVER)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return d / "driver.py", env


def launch(driver, workdir, kill="none:0"):
  script, env = driver
  return subprocess.Popen([sys.executable, str(script), str(workdir), kill, *OVERRIDES], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def wait_for(proc, line_prefix):
  """Read stdout until a line starting with `line_prefix`; returns all lines read."""
  lines = []
  for line in proc.stdout:
    lines.append(line.strip())
    if line.startswith(line_prefix):
      return lines
  raise AssertionError(f"process ended before {line_prefix!r}: rc={proc.wait()} stderr={proc.stderr.read()[-3000:]}")


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def steps(workdir):
  return Checkpointer(workdir / "checkpoints", read_only=True).all_steps()


def test_killed_and_preempted_run_resumes_exactly(tmp_path, driver):
  ref, run = tmp_path / "reference", tmp_path / "interrupted"
  rc, out, err = finish(launch(driver, ref))
  assert rc == 0 and "RESULT done 12" in out, err[-3000:]

  def first_step(out):
    return int(out.split("EVENT step_dispatched ")[1].split()[0])

  # 1. SIGKILL right after step 5 was dispatched (its computation in flight). Step 3's async save
  #    may or may not have been finalized by then: either it is complete or absent, never partial.
  rc, out, err = finish(launch(driver, run, "step_dispatched:5"))
  assert rc == -signal.SIGKILL, err[-3000:]
  assert steps(run) in ([], [3])
  # 2. SIGKILL while step 6's checkpoint is being written (async): step 6 is absent or complete.
  latest = (steps(run) or [0])[-1]
  rc, out, err = finish(launch(driver, run, "save_dispatched:6"))
  assert rc == -signal.SIGKILL and first_step(out) == latest + 1, err[-3000:]
  assert steps(run) in ([3], [3, 6])
  # 3. SIGTERM (preemption notice) during the run: it saves the step it reached and exits 75.
  latest = steps(run)[-1]
  proc = launch(driver, run)
  lines = wait_for(proc, "EVENT step_dispatched 8")
  proc.send_signal(signal.SIGTERM)
  rc, out, err = finish(proc)
  assert rc == 75, err[-3000:]
  assert first_step("\n".join(lines)) == latest + 1
  preempted_at = int(out.split("RESULT preempted ")[1].split()[0])
  assert 8 <= preempted_at <= 12 and steps(run)[-1] == preempted_at
  # 4. SIGKILL from outside at an arbitrary moment.
  if preempted_at < 11:
    proc = launch(driver, run)
    wait_for(proc, f"EVENT step_dispatched {preempted_at + 2}")
    proc.send_signal(signal.SIGKILL)
    finish(proc)
  # 5. Run to the end.
  rc, out, err = finish(launch(driver, run))
  assert rc == 0 and "RESULT done 12" in out, err[-3000:]

  a, b = np.load(ref / "final.npz"), np.load(run / "final.npz")
  assert sorted(a) == sorted(b)
  worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
  assert worst <= 1e-6
  assert all(np.array_equal(a[k], b[k]) for k in a), f"not bit-identical (max diff {worst})"
  # metrics.jsonl: every step exactly once, lines logged after the restored checkpoint were replaced
  logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert logged == list(range(1, 13))
  ref_loss = [json.loads(line)["train/loss"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
  run_loss = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert run_loss == ref_loss


def _cfg(*extra):
  return load_config("tiny_lm", ["--config.total_steps=4", "--config.checkpoint.every_steps=2",
                                 "--config.log.tensorboard=false", "--config.mesh.fsdp=2", "--config.mesh.data=4",
                                 *extra])


def test_workdir_guard_and_config_errors_before_anything_is_written(tmp_path):
  bad = _cfg("--config.batch_size=6")  # 6 rows on data x fsdp = 8 shards
  with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the data-parallel size"):
    train(bad, tmp_path / "bad", build_task(bad))
  assert not (tmp_path / "bad").exists()

  cfg = _cfg()
  first = train(cfg, tmp_path / "run", build_task(cfg))
  assert first.step == 4 and steps(tmp_path / "run") == [2, 4]
  before = (tmp_path / "run" / "config.json").read_text()
  other = _cfg("--config.optim.lr=0.01")
  with pytest.raises(WorkdirError, match=r"different config:\n  optim.lr: 0.003 -> 0.01"):
    train(other, tmp_path / "run", build_task(other))
  assert (tmp_path / "run" / "config.json").read_text() == before and steps(tmp_path / "run") == [2, 4]
  # same config: resumes (nothing left to do); --resume with a longer run: continues from step 4
  assert train(cfg, tmp_path / "run", build_task(cfg)).resumed_from == 4
  longer = _cfg("--config.total_steps=6")
  r = train(longer, tmp_path / "run", build_task(longer), existing="resume")
  assert r.resumed_from == 4 and r.step == 6 and steps(tmp_path / "run") == [2, 4, 6]
  assert (tmp_path / "run" / "config.1.json").read_text() == before
  # --overwrite: the old run's checkpoints, base, config and metrics are deleted, the new config written
  prepare_workdir(tmp_path / "run", config_to_dict(other), "overwrite")
  assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
  assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["lr"] == 0.01


def _nan_task(cfg, nan_at):
  """The tiny LM task whose loss is multiplied by a batch field that is NaN on batch `nan_at` (1-based)."""
  task = build_task(cfg)
  base_loss, make_data = task.loss_fn, task.make_data

  def loss_fn(params, frozen, batch, rng):
    loss, metrics = base_loss(params, frozen, {k: v for k, v in batch.items() if k != "scale"}, rng)
    return loss * batch["scale"][0], metrics

  class Data:
    def __init__(self, rows):
      self.inner = make_data(rows)

    def __next__(self):
      b = next(self.inner)
      b["scale"] = np.full((len(b["tokens"]),), np.nan if self.inner.position == nan_at else 1.0, np.float32)
      return b

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, s):
      self.inner.set_state(s)

  task.loss_fn, task.make_data = loss_fn, Data
  task.batch_spec = dict(task.batch_spec, scale=jax.ShapeDtypeStruct((cfg.batch_size,), np.float32))
  return task


def test_nonfinite_guard_in_the_loop_never_reaches_a_checkpoint(tmp_path):
  cfg = _cfg("--config.checkpoint.every_steps=1", "--config.checkpoint.keep=4", "--config.log.every_steps=1",
             "--config.guards.max_skipped_fraction=0.25")  # 1 skipped step of 4 is allowed here
  r = train(cfg, tmp_path / "skip", _nan_task(cfg, nan_at=3))
  assert r.status == "done" and int(r.state.nonfinite_count) == 1
  ck = Checkpointer(tmp_path / "skip" / "checkpoints", read_only=True)
  assert ck.all_steps() == [1, 2, 3, 4]
  first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore = lambda step: ck.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(
      jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=first),
                   ck.manager.item_metadata(step)["params"].tree))))["params"]
  p2, p3 = restore(2), restore(3)
  leaves2, leaves3 = jax.tree.leaves(p2), jax.tree.leaves(p3)
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves3)
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves2, leaves3))  # skipped
  logged = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
  assert [m["train/nonfinite_count"] for m in logged] == [0, 0, 1, 1]

  stop = _cfg("--config.guards.nonfinite=stop", "--config.checkpoint.every_steps=1")
  with pytest.raises(NonFiniteError, match="step 3"):
    train(stop, tmp_path / "stop", _nan_task(stop, nan_at=3))
  assert steps(tmp_path / "stop")[-1] <= 3
