"""gs:// paths against a real local GCS JSON-API server (tests/gcs_emulator.py): the storage layer every
remote workdir relies on. Each assertion is also checked on the server's own object listing (plain
HTTP, no client library), so a client that silently wrote to local disk would fail."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath


def test_epath_write_read_glob_rename_delete(gcs_bucket, gcs_emulator):
  bucket = gcs_bucket.removeprefix("gs://")
  root = epath.Path(gcs_bucket) / "run"
  (root / "a").mkdir(parents=True, exist_ok=True)
  (root / "a" / "x.txt").write_text("hello")
  (root / "a" / "y.bin").write_bytes(b"\x00\x01")
  (root / "b.json").write_text("{}")
  assert (root / "a" / "x.txt").read_text() == "hello"
  assert (root / "a" / "y.bin").read_bytes() == b"\x00\x01"
  assert sorted(p.name for p in root.glob("a/*")) == ["x.txt", "y.bin"]
  assert (root / "a").is_dir() and not (root / "nope").exists()
  assert "run/a/x.txt" in gcs_emulator.list_objects(bucket, "run/")

  (root / "a" / "x.txt").rename(root / "a" / "z.txt")  # how checkpoint / report writers commit a file
  assert not (root / "a" / "x.txt").exists() and (root / "a" / "z.txt").read_text() == "hello"
  (root / "b.json").unlink()
  (root / "a").rmtree()
  assert gcs_emulator.list_objects(bucket, "run/") == []


def test_orbax_checkpoint_manager_save_restore(gcs_bucket, gcs_emulator):
  """Orbax writes the arrays with tensorstore (its own GCS client) and the metadata with epath."""
  import orbax.checkpoint as ocp

  directory = f"{gcs_bucket}/ckpt"
  tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": {"c": jnp.ones((5,), jnp.int32)}}
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  for step in (1, 2, 3):
    mngr.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x: x * step, tree)))
  mngr.wait_until_finished()
  mngr.close()

  mngr = ocp.CheckpointManager(directory)  # a fresh manager sees only what is on the server
  assert mngr.all_steps() == [2, 3]  # max_to_keep deleted step 1 on the server
  restored = mngr.restore(3, args=ocp.args.StandardRestore(jax.tree.map(jnp.zeros_like, tree)))
  mngr.close()
  np.testing.assert_array_equal(restored["w"], np.arange(12.0).reshape(3, 4) * 3)
  np.testing.assert_array_equal(restored["b"]["c"], np.full((5,), 3))
  names = gcs_emulator.list_objects(gcs_bucket.removeprefix("gs://"), "ckpt/")
  assert any(n.startswith("ckpt/3/") for n in names) and not any(n.startswith("ckpt/1/") for n in names)


def test_emulator_stops_when_its_parent_dies(tmp_path):
  """A parent killed with SIGKILL (no cleanup runs) leaves no server behind."""
  pytest.importorskip("gcp_storage_emulator")
  code = ("import sys, time; sys.path.insert(0, %r)\n"
          "from gcs_emulator import GcsEmulator\n"
          "e = GcsEmulator().start(); print(e.proc.pid, flush=True); time.sleep(60)\n"
          % os.path.dirname(__file__))
  parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  child_pid = int(parent.stdout.readline())
  os.kill(parent.pid, signal.SIGKILL)
  parent.wait()
  for _ in range(100):  # the child polls every 0.5 s
    try:
      with open(f"/proc/{child_pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped by init
          return
    except FileNotFoundError:
      return
    time.sleep(0.1)
  os.kill(child_pid, signal.SIGKILL)
  pytest.fail("the emulator outlived its parent")


def test_tensorstore_rewrites_an_existing_ocdbt_database(gcs_bucket):
  """What Orbax does when a checkpoint step left behind by a killed run is written again: tensorstore
  reads the existing manifest (needs the object's generation from the server) and updates it."""
  import tensorstore as ts

  spec = {"driver": "ocdbt", "base": f"{gcs_bucket}/db/"}
  kv = ts.KvStore.open(spec).result()
  kv.write(b"k", b"first").result()
  del kv
  kv = ts.KvStore.open(spec).result()  # a fresh handle: the manifest is read back from the server
  assert kv.read(b"k").result().value == b"first"
  kv.write(b"k", b"second").result()
  kv2 = ts.KvStore.open(spec).result()
  assert kv2.read(b"k").result().value == b"second"
  plain = ts.KvStore.open(f"{gcs_bucket}/plain/").result()
  plain.write(b"x", b"1").result()
  assert plain.read(b"x").result().stamp.generation  # the server's generation came through
