"""Small runs of the stages on real sources: `data.max_train` / `data.max_eval` (seeded samples that
draw on every source) and `data.mode` reaching the reward-model stage (lenient drops over-long pairs)."""

from __future__ import annotations

import gzip
import json
import pathlib

import pytest

from pro_jax.configs import load_config
from pro_jax.configs.pro_base import pro_config
from pro_jax.data.errors import DataError
from pro_jax.stages.context import load_context
from pro_jax.stages.pipeline import run_stage

TOKENIZER = pathlib.Path(__file__).parent / "golden" / "fixtures" / "bart_cls2_tok"
N = 12  # rows per file


def _hh_files(root: pathlib.Path) -> str:
  """Two HH-RLHF-layout test files (helpful-base, harmless-base) of N rows whose prompts name their file
  and row."""
  for config in ("helpful-base", "harmless-base"):
    (root / config).mkdir(parents=True)
    with gzip.open(root / config / "test.jsonl.gz", "wt") as f:
      for i in range(N):
        q = f"\n\nHuman: {config} question {i}?\n\nAssistant:"
        f.write(json.dumps({"chosen": q + " a good answer.", "rejected": q + " a bad one."}) + "\n")
  return str(root)


def _user_text(ex: dict) -> str:
  return ex["prompt"][-1]["content"]


def test_max_train_and_max_eval_are_seeded_samples_of_every_source(tmp_path):
  c = pro_config()
  c.objectives = ("helpful", "harmless")
  c.tokenizer = str(TOKENIZER)
  c.data.update(sources=("hh_rlhf/helpful-base:test", "hh_rlhf/harmless-base:test"), manual_dir=_hh_files(tmp_path / "hh"),
                eval_fraction=0.25, max_eval=4, max_train=8)
  full = load_context(_without_limits(c), str(tmp_path / "w0"))
  assert (len(full.train), len(full.eval)) == (18, 6)  # 24 rows, 6 held out
  ctx = load_context(c, str(tmp_path / "w1"))
  train, held = [_user_text(e) for e in ctx.train], [_user_text(e) for e in ctx.eval]
  full_train, full_held = [_user_text(e) for e in full.train], [_user_text(e) for e in full.eval]
  assert (len(train), len(held)) == (8, 4)
  # samples of the unlimited splits, in their order (so train and held out stay disjoint)
  assert set(train) <= set(full_train) and set(held) <= set(full_held) and not set(train) & set(held)
  assert train == [t for t in full_train if t in set(train)] and held == [t for t in full_held if t in set(held)]
  # both files are drawn on: the first 8 training rows would all be helpful-base ones (12 per file)
  assert full_train[:8] == [t for t in full_train if t.startswith("helpful")][:8]
  assert {t.split()[0] for t in train} == {"helpful-base", "harmless-base"}
  # seeded: the same config gives the same rows, another seed other rows
  assert [_user_text(e) for e in load_context(c, str(tmp_path / "w2")).train] == train
  c.seed = 1
  assert [_user_text(e) for e in load_context(c, str(tmp_path / "w3")).train] != train


def _without_limits(c):
  c = c.copy_and_resolve_references()
  c.data.update(max_eval=0, max_train=0)
  return c


RM_TINY = ["--config.task.n_train=32", "--config.task.n_eval=8", "--config.model.d_model=32",
           "--config.model.mlp_dim=64", "--config.model.n_layers=1", "--config.rm.pro.source=scratch",
           "--config.rm.total_steps=1", "--config.rm.batch_size=8", "--config.rm.optim.warmup_steps=1",
           "--config.rm.log.tensorboard=false", "--config.rm.log.progress=false", "--config.data.max_response_len=20"]


@pytest.mark.slow  # ~45 s on the loaded shared 2-core host (compiles and runs a 1-step reward model)
def test_rm_stage_follows_data_mode_for_over_long_pairs(tmp_path):
  # 20 response tokens: some (not all) of the embedded task's pairs are longer (its demo allows 48)
  with pytest.raises(DataError, match=r"over max_response_len=20"):
    run_stage("rm", load_config("demo", RM_TINY + ["--config.data.mode=strict"]), str(tmp_path / "strict"))
  held = run_stage("rm", load_config("demo", RM_TINY + ["--config.data.mode=lenient"]), str(tmp_path / "lenient"))
  assert (tmp_path / "lenient" / "rm" / "heldout.json").exists()
  assert sum(held["count"].values()) > 0  # some held-out pairs fit and were scored
