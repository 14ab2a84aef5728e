"""pro_jax.data.files: the same calls on a local folder and on gs:// (the emulator)."""

import json
import os
import sqlite3

import pytest

from pro_jax.data import files


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "w")
  return request.getfixturevalue("gcs_bucket") + "/w"


def test_write_read_local_copy_upload_and_mirror(root, tmp_path, monkeypatch):
  (tmp_path / "tmp").mkdir()
  monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
  import tempfile

  monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
  files.write_text(files.join(root, "a", "b.json"), json.dumps({"x": 1}))
  assert json.loads(files.as_path(files.join(root, "a", "b.json")).read_text()) == {"x": 1}
  assert files.is_remote(root) == root.startswith("gs://")
  if not files.is_remote(root):
    assert not list(files.as_path(root).glob("a/*.tmp"))  # the temp file was renamed into place

  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  (src / "t.json").write_text("{}")
  (src / "sub" / "v.bin").write_bytes(b"\x00\x01")
  files.upload(src, files.join(root, "tok"))
  copy = files.local_copy(files.join(root, "tok"))
  assert (copy / "t.json").read_text() == "{}" and (copy / "sub" / "v.bin").read_bytes() == b"\x00\x01"
  if files.is_remote(root):
    assert str(copy).startswith(str(tmp_path / "tmp"))  # downloaded under the temp dir, not the cwd

  m = files.Mirror(files.join(root, "scores.sqlite"))
  with sqlite3.connect(m.local) as db:
    db.execute("CREATE TABLE t (k TEXT)")
    db.execute("INSERT INTO t VALUES ('a')")
  m.push()
  m2 = files.Mirror(files.join(root, "scores.sqlite"))  # what a resumed run (another VM) sees
  with sqlite3.connect(m2.local) as db:
    assert db.execute("SELECT k FROM t").fetchall() == [("a",)]
  assert files.as_path(files.join(root, "scores.sqlite")).exists()


def test_as_path_never_makes_a_url_local(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(files.as_path("gs://b/runs/hh")) == "gs://b/runs/hh"
  assert files.join("gs://b/runs/hh", "sft", "checkpoints") == "gs://b/runs/hh/sft/checkpoints"
  assert str(files.as_path("rel/x")) == os.path.join(str(tmp_path), "rel", "x")


def test_staged_directory_replaces_only_a_finished_directory(tmp_path):
  target = tmp_path / "out"
  target.mkdir()
  (target / "old.txt").write_text("old")
  with pytest.raises(OSError, match="disk full"):
    with files.staged_directory(target) as tmp:
      (tmp / "new.txt").write_text("half")
      raise OSError("disk full")
  assert [p.name for p in target.iterdir()] == ["old.txt"]
  assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporary directory left behind"
  with files.staged_directory(target) as tmp:
    (tmp / "new.txt").write_text("new")
    assert (target / "old.txt").is_file()  # the old directory stays until the new one is complete
  assert [p.name for p in target.iterdir()] == ["new.txt"]
  assert [p.name for p in tmp_path.iterdir()] == ["out"]
  with files.staged_directory(tmp_path / "a" / "b", write=False) as tmp:  # another host: makes nothing
    assert not tmp.exists()
  assert not (tmp_path / "a").exists()
