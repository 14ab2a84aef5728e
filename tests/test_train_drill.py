"""The preemption drill: a real training process killed with SIGKILL at random moments, several times in
a row (mid-step, mid-save, right after a checkpoint was committed with that newest step then damaged
on disk, at arbitrary wall-clock moments), rerun with the same command each time, ends bit-identical
to an uninterrupted run: parameters, optimizer state, rng, step counters and the loss curve.

The plan is random but seeded (PRO_JAX_DRILL_SEED, default 0) so a failure reproduces; the plan is
printed in every assertion message.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

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
    print(f"RESUMED {r.resumed_from}", flush=True)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(r.state))  # params, opt_state, rng, counters
    np.savez(os.path.join(workdir, "final.npz"), **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    print(f"RESULT {r.status} {r.step}", flush=True)
""")

TOTAL, EVERY = 16, 2
OVERRIDES = [f"--config.total_steps={TOTAL}", f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=2",
             "--config.log.every_steps=1", "--config.log.tensorboard=false", "--config.log.progress=false"]


def _steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if d.is_dir() else []


def _truncate(path):
  for root, _, files in os.walk(path):
    for f in files:
      open(os.path.join(root, f), "wb").close()


@pytest.mark.slow
def test_preemption_drill_random_sigkills_and_a_damaged_newest_step(tmp_path):
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  rng = np.random.default_rng(int(os.environ.get("PRO_JAX_DRILL_SEED", "0")))
  plan: list[str] = []

  def launch(workdir, kill="none:0"):
    return subprocess.Popen([sys.executable, str(script), str(workdir), kill, *OVERRIDES], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)

  def run(workdir, kill="none:0"):
    proc = launch(workdir, kill)
    out, err = proc.communicate(timeout=300)
    plan.append(f"{kill} -> rc {proc.returncode}, checkpoints {_steps(workdir)}")
    return proc.returncode, out, err

  def first_step(out):
    return int(out.split("EVENT step_dispatched ")[1].split()[0]) if "EVENT step_dispatched" in out else None

  ref, w = tmp_path / "reference", tmp_path / "drill"
  rc, out, err = run(ref)
  assert rc == 0 and f"RESULT done {TOTAL}" in out, err[-3000:]

  # 1. mid-step: killed right after a random step was dispatched
  k = int(rng.integers(3, 6))
  rc, out, err = run(w, f"step_dispatched:{k}")
  assert rc == -signal.SIGKILL, (plan, err[-3000:])
  # 2. mid-save: killed while a random later checkpoint is being written (async)
  latest = (_steps(w) or [0])[-1]
  k = latest + EVERY * int(rng.integers(1, 3))
  rc, out, err = run(w, f"save_dispatched:{k}")
  assert rc == -signal.SIGKILL and first_step(out) == latest + 1, (plan, err[-3000:])
  assert _steps(w)[-1] in (k - EVERY, k), plan  # the step being written: absent or complete, never partial
  # 3. right after a commit (saving step k waits for step k - EVERY to be committed), then that newest
  #    committed step is damaged on disk: the next runs must move it aside, not fail on it forever
  latest = _steps(w)[-1]
  k = max(latest + 2 * EVERY, 4 * EVERY)
  rc, out, err = run(w, f"save_dispatched:{k}")
  assert rc == -signal.SIGKILL and first_step(out) == latest + 1, (plan, err[-3000:])
  newest = _steps(w)[-1]
  assert newest >= k - EVERY and len(_steps(w)) >= 2, plan
  _truncate(w / "checkpoints" / str(newest) / "params")
  plan.append(f"damaged step {newest}")
  fallback = _steps(w)[-2]
  # 4. two kills at random wall-clock moments; the first resumes from the step before the damaged one
  for i in range(2):
    proc = launch(w)
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("EVENT step_dispatched"):
        break
    delay = float(rng.uniform(0.0, 2.0))
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    plan.append(f"kill after {delay:.2f}s -> rc {proc.returncode}, checkpoints {_steps(w)}")
    if i == 0:
      assert first_step("".join(lines)) == fallback + 1, (plan, err[-3000:])
      assert (w / "checkpoints.damaged" / str(newest) / "params").is_dir(), plan  # kept, not deleted
  # 5. to the end, then once more (a finished run reruns to "done" at once)
  rc, out, err = run(w)
  assert rc == 0 and f"RESULT done {TOTAL}" in out, (plan, err[-3000:])
  a, b = np.load(ref / "final.npz"), np.load(w / "final.npz")
  assert sorted(a) == sorted(b) and any("opt_state" in key for key in a), plan
  differ = [key for key in a if not np.array_equal(a[key], b[key])]
  assert not differ, (plan, differ)  # bit-identical: params, Adam moments and count, rng, step, nonfinite_count
  rc, out, err = run(w)
  assert rc == 0 and f"RESUMED {TOTAL}" in out and f"RESULT done {TOTAL}" in out, (plan, err[-3000:])
  # the loss curve: every step logged exactly once, the same losses as the uninterrupted run
  load = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
  assert [m["step"] for m in load(w)] == list(range(1, TOTAL + 1)), plan
  assert [m["train/loss"] for m in load(w)] == [m["train/loss"] for m in load(ref)], plan
