"""A damaged newest checkpoint: training moves it aside and goes on (no crash loop); the loader falls
back to the newest readable step or raises one error naming the directory, step and item."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from pro_jax.configs import load_config
from pro_jax.train.checkpoint import CheckpointReadError, Checkpointer, load_checkpoint
from pro_jax.train.tasks import build_task
from pro_jax.train.trainer import train


def _cfg():
  return load_config("tiny_lm", ["--config.total_steps=4", "--config.checkpoint.every_steps=2",
                                 "--config.checkpoint.keep=3", "--config.log.tensorboard=false",
                                 "--config.log.every_steps=1", "--config.mesh.fsdp=2", "--config.mesh.data=4"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4, and its final parameters."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  cfg = _cfg()
  r = train(cfg, workdir, build_task(cfg))
  assert r.status == "done" and r.step == 4
  return workdir, jax.device_get(r.state)


def _copy(run, tmp_path):
  dst = tmp_path / "w"
  shutil.copytree(run, dst)
  return dst


def truncate(path):
  """Truncate every file under `path` to 0 bytes (a disk that lost the data after the commit)."""
  n = 0
  for root, _, files in os.walk(path):
    for f in files:
      open(os.path.join(root, f), "wb").close()
      n += 1
  assert n, path


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_damaged_newest_step_is_moved_aside_and_training_goes_on(finished_run, tmp_path, caplog):
  run, final = finished_run
  w = _copy(run, tmp_path)
  truncate(w / "checkpoints" / "4" / "params")
  cfg = _cfg()
  with caplog.at_level(logging.WARNING, logger="pro_jax"):
    first = train(cfg, w, build_task(cfg))  # was: StepAlreadyExistsError at step 4, on every rerun
  assert first.resumed_from == 2 and first.status == "done" and first.step == 4
  assert "moved unreadable checkpoint step 4 aside" in caplog.text
  kept = w / "checkpoints.damaged" / "4"
  assert (kept / "params").is_dir() and (kept / "train").is_dir()  # kept for inspection, not deleted
  assert Checkpointer(w / "checkpoints", read_only=True).all_steps() == [2, 4]
  # step 4 trained again from step 2 is bit-identical to the original step 4
  assert _equal(jax.device_get(first.state), final)
  second = train(cfg, w, build_task(cfg))  # and the next rerun resumes from the rewritten step 4
  assert second.resumed_from == 4 and second.status == "done"
  assert sorted(os.listdir(w / "checkpoints.damaged")) == ["4"]


def test_no_readable_step_is_one_error_and_nothing_is_moved(finished_run, tmp_path):
  w = _copy(finished_run[0], tmp_path)
  truncate(w / "checkpoints" / "4" / "params")
  truncate(w / "checkpoints" / "2" / "train")
  cfg = _cfg()
  with pytest.raises(CheckpointReadError) as e:
    train(cfg, w, build_task(cfg))
  msg = str(e.value)
  assert "nothing was moved or deleted" in msg
  assert f"{w / 'checkpoints'}/4: item 'params'" in msg and f"{w / 'checkpoints'}/2: item 'train'" in msg
  assert Checkpointer(w / "checkpoints", read_only=True).all_steps() == [2, 4]
  assert not (w / "checkpoints.damaged").exists()


@pytest.mark.parametrize("item", ["params", "meta", "extra"])
def test_load_checkpoint_falls_back_or_names_directory_step_and_item(finished_run, tmp_path, caplog, item):
  run, _ = finished_run
  w = _copy(run, tmp_path)
  good = load_checkpoint(w, step=2)
  truncate(w / "checkpoints" / "4" / item)
  with caplog.at_level(logging.WARNING, logger="pro_jax"):
    ck = load_checkpoint(w)  # was: a raw Orbax KeyError / DATA_LOSS / JSONDecodeError
  assert ck.step == 2 and _equal(ck.variables, good.variables)
  assert f"checkpoint step 4 cannot be loaded ({w / 'checkpoints'}/4: item '{item}'" in caplog.text
  with pytest.raises(CheckpointReadError, match=rf"{w / 'checkpoints'}/4: item '{item}' cannot be read") as e:
    load_checkpoint(w, step=4)  # an explicit step never falls back
  assert e.value.step == 4 and e.value.item == item
  assert (w / "checkpoints" / "4").is_dir()  # the loader is read-only: nothing moved
  truncate(w / "checkpoints" / "2" / item)
  with pytest.raises(CheckpointReadError, match=r"no checkpoint in .* can be loaded:\n.*/4: item .*\n.*/2: item"):
    load_checkpoint(w)
