"""Every bad input is a clear error (file, row or field), exit 2, before anything is written: token
files, the workdir, its config.json; empty data files in strict mode; the generic builder names the
user's own column."""

import json

import numpy as np
import pytest

from pro_jax.cli import main
from pro_jax.data import sources
from pro_jax.data.builders.generic import GenericConfig
from pro_jax.data.errors import DataError

TRAIN = ["train", "--config", "tiny_lm", "--config.total_steps=2", "--config.log.tensorboard=false"]


def _write_tokens(path, kind):
  if kind == "object":
    np.save(path, np.array([1, "a", None] * 100, dtype=object), allow_pickle=True)
  elif kind == "garbage":
    path.write_bytes(b"this is not a numpy file\n" * 40)
  elif kind == "odd":
    path.write_bytes(b"\x01\x00" * 500 + b"\x01")
  elif kind == "float":
    np.save(path, np.arange(1000, dtype=np.float32) % 100)
  elif kind == "late_out_of_range":
    tokens = np.arange(2**20 + 100, dtype=np.int32) % 128
    tokens[2**20 + 50] = 5000  # past the first 2^20 tokens, which is all that used to be checked
    np.save(path, tokens)


@pytest.mark.parametrize("kind, name, message", [
    ("object", "t.npy", "not a readable .npy array of token ids"),
    ("garbage", "t.npy", "not a readable .npy array of token ids"),
    ("odd", "t.bin", "1001 bytes; a .bin token file is raw uint16 ids"),
    ("float", "t.npy", "token ids must be integers, the file holds dtype float32"),
    ("late_out_of_range", "t.npy", "token #1048626 has id 5000, outside [0, model.vocab_size=128)"),
])
def test_bad_token_file_is_a_usage_error_naming_it(tmp_path, capsys, kind, name, message):
  path = tmp_path / name
  _write_tokens(path, kind)
  workdir = tmp_path / "run"
  rc = main([*TRAIN, "--workdir", str(workdir), "--config.data.kind=tokens", f"--config.data.path={path}"])
  err = capsys.readouterr().err
  assert rc == 2 and f"{path}: {message}" in err, err[-2000:]
  assert not workdir.exists()


def test_workdir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
  path = tmp_path / "not_a_dir"
  path.write_text("mine\n")
  rc = main([*TRAIN, "--workdir", str(path)])
  err = capsys.readouterr().err
  assert rc == 2 and f"{path} exists and is not a directory" in err, err[-2000:]
  assert path.read_text() == "mine\n"


def test_corrupt_workdir_config_is_a_usage_error_naming_the_file(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"seed": 0, "mod')
  rc = main([*TRAIN, "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert rc == 2 and f"{workdir / 'config.json'} is not a valid JSON config" in err, err[-2000:]
  assert "--overwrite" in err
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]
  assert (workdir / "config.json").read_text() == '{"seed": 0, "mod'


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_empty_data_file_is_an_error_in_strict_mode(tmp_path):
  (tmp_path / "train.jsonl").write_text("")
  config = GenericConfig(name="e", columns={"prompt": "q", "chosen": "a", "rejected": "b"}, objectives=["x"])
  with pytest.raises(DataError, match=r"train.jsonl: the file holds no rows \(strict mode"):
    sources.load_examples("generic_preferences", "train", manual_dir=str(tmp_path), config=config)
  assert len(sources.load_examples("generic_preferences", "train", manual_dir=str(tmp_path), config=config,
                                   mode="lenient")) == 0


@pytest.mark.parametrize("row, columns, field", [
    ({"q": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "a": "1", "b": "2"},
     {}, "q[1].role"),
    ({"q": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "s": "Be brief.",
      "a": "1", "b": "2"}, {"system": "s"}, "q[1].role"),  # the system column's turn does not shift it
    ({"q": [{"role": "assistant", "content": "hi"}], "a": "1", "b": "2"}, {}, "q[0].role"),
    ({"q": "hi", "a": "same", "b": "same"}, {}, "b"),
])
def test_generic_builder_errors_name_the_users_column(tmp_path, row, columns, field):
  _write_jsonl(tmp_path / "train.jsonl", [{"q": "fine", "a": "1", "b": "2"}, row])
  config = GenericConfig(name="cols", columns={"prompt": "q", "chosen": "a", "rejected": "b", **columns},
                         objectives=["x"])
  with pytest.raises(DataError) as e:
    sources.load_examples("generic_preferences", "train", manual_dir=str(tmp_path), config=config)
  assert e.value.field == field and e.value.row == 2, str(e.value)
  assert f"train.jsonl: row 2: field {field!r}" in str(e.value)


def test_a_run_saved_before_a_setting_existed_still_resumes(tmp_path):
  """A config.json without a key the schema gained since (at its default) is the same run: the rerun
  resumes instead of failing the workdir guard (an automatic resume after an upgrade)."""
  from pro_jax.configs import load_config
  from pro_jax.train.config import config_to_dict
  from pro_jax.train.trainer import WorkdirError, prepare_workdir
  cfg = config_to_dict(load_config("tiny_lm"))
  old = json.loads(json.dumps(cfg))
  del old["guards"]["max_skipped_fraction"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  prepare_workdir(tmp_path, cfg, "auto")  # was: WorkdirError "guards.max_skipped_fraction: (absent) -> 0.1"
  assert json.loads((tmp_path / "config.json").read_text()) == old  # same run: nothing rewritten
  changed = json.loads(json.dumps(cfg))
  changed["guards"]["max_skipped_fraction"] = 0.5  # not the default: a real difference
  with pytest.raises(WorkdirError, match=r"guards.max_skipped_fraction: \(absent\) -> 0.5"):
    prepare_workdir(tmp_path, changed, "auto")
