"""Issue 12 point 6: the PRO stage commands check everything (engine config of every stage they run,
model sources, data rows) before they write anything, write W/tokenizer whole (temporary name, then
rename), rebuild a damaged saved tokenizer instead of failing every rerun, and never save a
non-finite checkpoint."""

import gzip
import json
import shutil

import jax
import numpy as np
import pytest

from pro_jax.cli import EXIT_FAIL, EXIT_USAGE, main
from pro_jax.configs import load_config
from pro_jax.data import synthetic

TINY = ["--config.task.n_train=48", "--config.task.n_eval=8", "--config.model.d_model=16",
        "--config.model.mlp_dim=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1"]
for _stage in ("sft", "rm", "adapter", "policy"):
  TINY += [f"--config.{_stage}.total_steps=3", f"--config.{_stage}.batch_size=8",
           f"--config.{_stage}.optim.warmup_steps=0", f"--config.{_stage}.log.progress=False",
           f"--config.{_stage}.log.tensorboard=False"]


def run(command, workdir, *overrides):
  return main([command, "--config", "demo", "--workdir", str(workdir), *TINY, *overrides])


@pytest.mark.parametrize("stage, overrides, message", [
    ("sft", ["--config.sft.model.dtype=float17"], "sft.model.dtype='float17' is not a floating-point dtype"),
    ("sft", ["--config.model.dtype=float17"], "model.dtype='float17' is not a floating-point dtype"),
    ("rm", ["--config.rm.optim.lr=nan", "--config.rm.pro.source=scratch"], "rm.optim.lr is NaN"),
    ("policy", ["--config.policy.pro.loss=ppo", "--config.policy.pro.init=scratch",
                "--config.policy.pro.reference=scratch", "--config.policy.pro.weights_source=uniform",
                "--config.policy.optim.lr=1e39"], "policy.optim.lr=1e+39 overflows float32"),
    # the whole pipeline: the policy's config is checked before the sft stage trains
    ("demo", ["--config.policy.optim.lr=nan"], "policy.optim.lr is NaN"),
    ("demo", ["--config.adapter.model.dtype=float17"], "adapter.model.dtype='float17'"),
    ("adapter", [], "adapter.pro.backbone='stage:sft'"),  # W/sft missing: named before anything is written
])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, stage, overrides, message):
  workdir = tmp_path / "w"
  assert run(stage, workdir, *overrides) == EXIT_USAGE
  err = capsys.readouterr().err
  assert f"pro-jax {stage}: error: invalid config" in err and message in err, err[-3000:]
  assert not workdir.exists()  # was: W/ and W/tokenizer left behind (or a TypeError traceback for float17)


def test_bad_config_adds_no_file_to_an_existing_workdir(tmp_path, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  assert run("rm", workdir, "--config.rm.pro.source=scratch", "--config.rm.optim.b2=1.5") == EXIT_USAGE
  assert "rm.optim.b1 / b2 must be in [0, 1)" in capsys.readouterr().err
  assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def _hh_rlhf(tmp_path, rows):
  """A manual_dir with hh_rlhf/helpful-base/train.jsonl.gz holding `rows`, and a tokenizer directory."""
  folder = tmp_path / "hh" / "helpful-base"
  folder.mkdir(parents=True)
  with gzip.open(folder / "train.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  tok = synthetic.build_tokenizer(None, tmp_path / "tok")
  return ["--config.data.sources=('hh_rlhf/helpful-base:train',)", f"--config.data.manual_dir={tmp_path / 'hh'}",
          "--config.data.mode=strict", "--config.objectives=('helpful','harmless')", f"--config.tokenizer={tok}"]


@pytest.mark.parametrize("stage", ["sft", "demo"])
def test_bad_data_row_exits_2_naming_file_row_field_and_writes_nothing(tmp_path, capsys, stage):
  good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
  bad = {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi\n\nAssistant: no"}  # no assistant turn
  data = _hh_rlhf(tmp_path, [good, bad])
  workdir = tmp_path / "w"
  assert run(stage, workdir, *data) == EXIT_USAGE
  err = capsys.readouterr().err
  assert "train.jsonl.gz: row 2: field 'chosen'" in err, err[-3000:]
  assert not workdir.exists()  # was: an empty workdir left behind


@pytest.mark.parametrize("stage", ["rm", "sft"])
def test_over_long_row_in_strict_mode_exits_2_before_anything_is_written(tmp_path, capsys, stage):
  """Strict mode: a row over data.max_response_len is named before the workdir or W/tokenizer exist
  (it was raised only when the stage tokenized its rows, after W/tokenizer had been written)."""
  good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
  long = {"chosen": "\n\nHuman: hi\n\nAssistant: " + "hello " * 200, "rejected": "\n\nHuman: hi\n\nAssistant: no"}
  data = _hh_rlhf(tmp_path, [good, good, long, good])
  workdir = tmp_path / "w"
  args = [*data, "--config.data.max_response_len=32", "--config.data.eval_fraction=0.25", "--config.rm.pro.source=scratch",
          "--config.sft.pro.source=scratch"]
  assert run(stage, workdir, *args) == EXIT_USAGE
  err = capsys.readouterr().err
  assert "over max_response_len=32" in err and "field 'chosen'" in err, err[-3000:]
  assert not workdir.exists()


def _context(workdir):
  from pro_jax.stages.context import load_context
  return load_context(load_config("demo", ["--config.task.n_train=48", "--config.task.n_eval=8"]), str(workdir))


def test_tokenizer_is_written_whole_after_the_checks(tmp_path, monkeypatch):
  """load_context writes nothing; write_workdir copies the tokenizer under a temporary name and renames
  it into place, so a write interrupted inside tokenizer.json leaves no W/tokenizer (was: written in
  place by save_pretrained, a half-written tokenizer.json then failed every rerun)."""
  workdir = tmp_path / "w"
  ctx = _context(workdir)
  assert not workdir.exists()  # reading and checking writes nothing
  real_copytree = shutil.copytree

  def interrupted(src, dst, *args, **kwargs):
    if str(src).endswith("tokenizer.json"):
      with open(dst, "w") as f:
        f.write('{"version": "1.0", "trunc')  # half of the file, then the process dies
      raise KeyboardInterrupt("killed mid-write")
    return shutil.copy2(src, dst, *args, **kwargs)

  monkeypatch.setattr(shutil, "copytree", lambda src, dst, **kw: real_copytree(src, dst, **{**kw, "copy_function": interrupted}))
  with pytest.raises(KeyboardInterrupt):
    ctx.write_workdir()
  monkeypatch.setattr(shutil, "copytree", real_copytree)
  assert sorted(p.name for p in workdir.iterdir()) == []  # no W/tokenizer, no temporary folder left
  again = _context(workdir)
  again.write_workdir()
  assert sorted(p.name for p in workdir.iterdir()) == ["tokenizer"]
  json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())  # whole
  ids = again.tokenizer("the cat", add_special_tokens=False)["input_ids"]
  assert ids == _context(workdir).tokenizer("the cat", add_special_tokens=False)["input_ids"]


def test_damaged_saved_tokenizer_is_rebuilt_with_a_warning(tmp_path, capsys):
  workdir = tmp_path / "w"
  first = _context(workdir)
  first.write_workdir()
  tok_json = workdir / "tokenizer" / "tokenizer.json"
  whole = tok_json.read_text()
  tok_json.write_text(whole[:len(whole) // 2])  # a half-written file (an interrupted write of old versions)
  capsys.readouterr()
  ctx = _context(workdir)  # was: "Unterminated string ..." on this and every later run
  out = capsys.readouterr().out
  assert f"the saved tokenizer {workdir / 'tokenizer'} fails to load" in out and "rebuilding" in out, out
  text = "the quick cat"
  assert ctx.tokenizer(text)["input_ids"] == first.tokenizer(text)["input_ids"]
  ctx.write_workdir()
  assert tok_json.read_text() == whole  # rebuilt in place
  assert (workdir / "tokenizer.damaged" / "tokenizer.json").read_text() == whole[:len(whole) // 2]  # kept
  capsys.readouterr()
  _context(workdir)
  assert "fails to load" not in capsys.readouterr().out  # the next run loads it


@pytest.mark.slow  # one real (tiny) reward-model run: ~15 s of CPU, mostly compiling
def test_stage_never_saves_a_non_finite_checkpoint(tmp_path, capsys):
  """The non-finite guard at stage level (rm, from scratch, a checkpoint every step). optim.lr=1e30 is
  finite in float32, so the config checks pass; the first update throws the parameters to ~1e30 and
  every later step's loss is non-finite: the run stops with exit 1 and a clear message, and every
  checkpoint it saved holds finite values. (This already held before the validate-first change; the
  test documents it. optim.lr=1e39, inf in float32, is refused before anything is written: the
  policy case of test_bad_config_exits_2_and_writes_nothing.)"""
  import pro_jax

  workdir = tmp_path / "w"
  rc = run("rm", workdir, "--config.rm.pro.source=scratch", "--config.rm.optim.lr=1e30",
           "--config.rm.log.every_steps=1", "--config.rm.checkpoint.every_steps=1")
  err = capsys.readouterr().err
  assert rc == EXIT_FAIL, err[-2000:]
  assert "pro-jax rm: stopped:" in err and "updates were skipped" in err, err[-2000:]
  steps = sorted(int(p.name) for p in (workdir / "rm" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and max(steps) < 3  # stopped before the end (3 steps)
  for step in steps:
    ck = pro_jax.load_checkpoint(str(workdir / "rm"), step=step)
    leaves = [np.asarray(x) for x in jax.tree.leaves(ck.variables)]
    assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating)), step
