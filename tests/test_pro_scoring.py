"""Scorers: an imported HF sequence classifier (golden fixture gpt2_cls1) stacked with a trained
multi-head RM and the synthetic programmatic rewards; the SQLite cache (hits / misses, persistence,
equality with fresh scores, concurrent writers of the same keys); scorer keys."""

import pathlib
import sqlite3
import threading
import time

import jax
import json

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pro_jax.data import synthetic
from pro_jax.models import ModelConfig
from pro_jax.models.hf_io import load_hf_model
from pro_jax.pro.normalize import fit_norm_stats
from pro_jax.stages import rm
from pro_jax.stages.scoring import (CachedScorer, RewardModelScorer, StackedScorer, hf_reward_scorer, scorer_key,
                                 tokenize_for_scoring)
from pro_jax.stages.stage import engine_config

FIXTURES = pathlib.Path(__file__).resolve().parent / "golden" / "fixtures"
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def char_tokenizer() -> PreTrainedTokenizerFast:
  """A character-level tokenizer with ids < 128 (gpt2_cls1 has vocab 128, n_positions 32):
  <pad> 0, <s> 1, </s> 2, <unk> 3, then "\\n" and printable ASCII."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  vocab.update({c: 4 + i for i, c in enumerate(CHARS)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")


def char_ids(text: str) -> list[int]:
  return [4 + CHARS.index(c) for c in text]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  cfg = synthetic.SyntheticTaskConfig(seed=1, n_train=256, n_eval=64)
  data = synthetic.generate_task(cfg)
  tok_dir = synthetic.build_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
  return cfg, data, AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def trained_rm(task, tmp_path_factory):
  """A small trained 3-head RM (40 steps) on the synthetic task, loaded back as a scorer."""
  cfg, data, tok = task
  workdir = tmp_path_factory.mktemp("rm")
  ecfg = engine_config(**{"total_steps": 40, "batch_size": 32, "optim.lr": 3e-3, "optim.warmup_steps": 5,
                          "checkpoint.every_steps": 40, "log.every_steps": 40, "log.progress": False,
                          "log.tensorboard": False})
  mc = ModelConfig(vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=64,
                   pad_token_id=tok.pad_token_id)
  rm.train_reward_model(ecfg, str(workdir), data["train"], tok, backbone_source="scratch", objectives=cfg.objectives,
                        model_config=mc, max_prompt_len=16, max_response_len=48)
  return rm.load_reward_model(str(workdir), batch_size=16)


# ---------------------------------------------------------------------------------------------- HF + stacking


def test_hf_classifier_scorer_matches_direct_apply():
  tok = char_tokenizer()
  hf = hf_reward_scorer(FIXTURES / "gpt2_cls1", "quality", tokenizer=tok, max_prompt_len=12, max_len=32, batch_size=4)
  assert hf.objectives == ("quality",) and hf.max_len == 32 and not hf.append_eos
  prompts = ["what color is the zorb ?", "hi"]
  responses = ["the zorb is blue .", "a much longer answer that has to be cut at the end"]
  # plain template: "\n\nHuman: {user}\n\nAssistant:" + " " + response; prompt: last 12 characters
  rows = []
  for p, r in zip(prompts, responses):
    p_ids = char_ids(f"\n\nHuman: {p}\n\nAssistant:")[-12:]
    rows.append((p_ids + char_ids(" " + r))[:32])
  tokens = np.zeros((2, 32), np.int32)
  mask = np.zeros((2, 32), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = 1
  model, params = load_hf_model(FIXTURES / "gpt2_cls1")
  want = np.asarray(jax.jit(model.apply)({"params": params}, tokens, mask).scores)
  np.testing.assert_allclose(hf.score(prompts, responses), want, rtol=1e-5, atol=1e-6)
  # the fixture's own golden output: our forward reproduces transformers on its golden inputs
  g = np.load(FIXTURES / "gpt2_cls1" / "golden.npz")
  got = hf.score_tokens(g["tokens"].astype(np.int32), g["mask"].astype(np.int32))
  np.testing.assert_allclose(got, g["scores"], rtol=1e-4, atol=1e-4)


def test_hf_reward_scorer_refuses_a_causal_lm_and_overlong_max_len():
  with pytest.raises(ValueError, match="not a sequence-classification checkpoint"):
    hf_reward_scorer(FIXTURES / "gpt2_lm", "x", tokenizer=char_tokenizer())
  with pytest.raises(ValueError, match="exceeds the model's 32 learned positions"):
    hf_reward_scorer(FIXTURES / "gpt2_cls1", "x", tokenizer=char_tokenizer(), max_prompt_len=8, max_len=40)
  with pytest.raises(ValueError, match="3 score labels, 1 objective names"):
    hf_reward_scorer(FIXTURES / "gpt2_cls3", "x", tokenizer=char_tokenizer(), max_prompt_len=8, max_len=32)


def test_stacked_scorer_hf_classifier_trained_heads_and_programmatic_rewards(task, trained_rm):
  cfg, data, _ = task
  hf = hf_reward_scorer(FIXTURES / "gpt2_cls1", "hf_quality", tokenizer=char_tokenizer(), max_prompt_len=12,
                        max_len=32, batch_size=8)
  prog = synthetic.SyntheticRewards(cfg)
  renamed = RewardModelScorer(trained_rm.model, trained_rm.variables, trained_rm.tokenizer,
                              [f"rm_{o}" for o in cfg.objectives], batch_size=16, max_prompt_len=16, max_len=64)
  stack = StackedScorer([hf, renamed, prog])
  assert stack.objectives == ("hf_quality", "rm_concise", "rm_informative", "rm_harmless", "concise", "informative",
                              "harmless")
  ex = data["eval"][:20]
  prompts = [e["prompt"] for e in ex]
  responses = [e["chosen"] for e in ex]
  got = stack.score(prompts, responses)
  assert got.shape == (20, 7) and got.dtype == np.float32
  np.testing.assert_array_equal(got[:, 0:1], hf.score(prompts, responses))
  np.testing.assert_array_equal(got[:, 1:4], trained_rm.score(prompts, responses))
  np.testing.assert_array_equal(got[:, 4:], prog.score(prompts, responses))
  # the programmatic columns are the task's recorded rewards of the chosen responses
  np.testing.assert_allclose(got[:, 4:], np.asarray([e["reward_chosen"] for e in ex]), rtol=1e-6)
  with pytest.raises(ValueError, match="duplicate objective names"):
    StackedScorer([prog, synthetic.SyntheticRewards(cfg)])


# ---------------------------------------------------------------------------------------------- cache


class Counting:
  """Wraps a scorer and records every batch it is asked to score."""

  def __init__(self, scorer, delay: float = 0.0):
    self.scorer, self.objectives, self.delay = scorer, scorer.objectives, delay
    self.calls: list[int] = []
    self.key = "counting:" + scorer_key(scorer)
    self._lock = threading.Lock()

  def score(self, prompts, responses):
    with self._lock:
      self.calls.append(len(responses))
    time.sleep(self.delay)
    return self.scorer.score(prompts, responses)


def test_cached_scorer_hits_misses_persistence_and_equality(task, trained_rm, tmp_path):
  cfg, data, _ = task
  seen, ex = set(), []  # 30 distinct (prompt, response) pairs: the eval split repeats some
  for e in data["eval"]:
    key = json.dumps([e["prompt"], e["chosen"]], sort_keys=True, default=str)
    if key not in seen:
      seen.add(key)
      ex.append(e)
  ex = ex[:30]
  assert len(ex) == 30
  prompts = [e["prompt"] for e in ex]
  chosen = [e["chosen"] for e in ex]
  fresh = trained_rm.score(prompts, chosen)
  inner = Counting(trained_rm)
  path = tmp_path / "cache" / "scores.sqlite"
  c1 = CachedScorer(inner, path)
  assert c1.objectives == trained_rm.objectives
  a = c1.score(prompts[:20], chosen[:20])
  assert (c1.hits, c1.misses, inner.calls) == (0, 20, [20])
  np.testing.assert_array_equal(a, fresh[:20])
  # overlapping call: 10 cached + 10 new; a repeated pair inside the call is scored once
  p2 = prompts[10:30] + [prompts[25]]
  r2 = chosen[10:30] + [chosen[25]]
  b = c1.score(p2, r2)
  assert inner.calls == [20, 10] and (c1.hits, c1.misses) == (10 + 1, 30)
  np.testing.assert_array_equal(b[:20], fresh[10:30])
  np.testing.assert_array_equal(b[20], fresh[25])
  # persistence: a new instance (another process would do the same) reads everything from the file
  inner2 = Counting(trained_rm)
  c2 = CachedScorer(inner2, path)
  c = c2.score(prompts[::-1], chosen[::-1])
  assert inner2.calls == [] and (c2.hits, c2.misses) == (30, 0)
  np.testing.assert_array_equal(c, fresh[::-1])
  with sqlite3.connect(path) as db:
    assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 30
  # the same text as a plain string and as a one-turn message list is the same prompt
  as_text = [p[0]["content"] for p in prompts[:5]]
  np.testing.assert_array_equal(c2.score(as_text, chosen[:5]), fresh[:5])
  assert inner2.calls == []
  # another scorer (other key) in the same file does not see these entries
  prog = Counting(synthetic.SyntheticRewards(cfg))
  c3 = CachedScorer(prog, path)
  np.testing.assert_allclose(c3.score(prompts, chosen), np.asarray([e["reward_chosen"] for e in ex]), rtol=1e-6)
  assert prog.calls == [30]


def test_cached_scorer_concurrent_duplicate_keys(task, tmp_path):
  cfg, data, _ = task
  ex = data["eval"][:40]
  prompts = [e["prompt"] for e in ex]
  responses = [e["rejected"] for e in ex]
  truth = synthetic.SyntheticRewards(cfg).score(prompts, responses)
  path = tmp_path / "shared.sqlite"
  inners = [Counting(synthetic.SyntheticRewards(cfg), delay=0.2) for _ in range(6)]
  caches = [CachedScorer(s, path) for s in inners]
  barrier = threading.Barrier(len(caches))
  results, errors = [None] * len(caches), []

  def work(i):
    try:
      barrier.wait()
      idx = np.random.default_rng(i).permutation(40)[:30]  # overlapping subsets, different orders
      results[i] = (idx, caches[i].score([prompts[j] for j in idx], [responses[j] for j in idx]))
    except Exception as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=work, args=(i,)) for i in range(len(caches))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  for idx, got in results:
    np.testing.assert_array_equal(got, truth[idx])
  with sqlite3.connect(path) as db:
    rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM scores").fetchone()
  covered = set().union(*(set(idx.tolist()) for idx, _ in results))
  assert rows == (len(covered), len(covered))
  # afterwards every pair is a hit for a fresh instance
  late = Counting(synthetic.SyntheticRewards(cfg))
  np.testing.assert_array_equal(CachedScorer(late, path).score([prompts[j] for j in sorted(covered)],
                                                               [responses[j] for j in sorted(covered)]),
                                truth[sorted(covered)])
  assert late.calls == []


def test_scorer_keys_tell_models_apart(task, trained_rm):
  cfg, _, _ = task
  same = RewardModelScorer(trained_rm.model, trained_rm.variables, trained_rm.tokenizer, trained_rm.objectives,
                           max_prompt_len=16, max_len=64, name=trained_rm.name)
  assert same.key == trained_rm.key
  other_vars = jax.tree.map(lambda x: x * 1.001, trained_rm.variables)
  other = RewardModelScorer(trained_rm.model, other_vars, trained_rm.tokenizer, trained_rm.objectives,
                            max_prompt_len=16, max_len=64, name=trained_rm.name)
  assert other.key != trained_rm.key
  shorter = RewardModelScorer(trained_rm.model, trained_rm.variables, trained_rm.tokenizer, trained_rm.objectives,
                              max_prompt_len=8, max_len=64, name=trained_rm.name)
  assert shorter.key != trained_rm.key
  other = synthetic.SyntheticRewards(synthetic.SyntheticTaskConfig(seed=2))
  assert scorer_key(synthetic.SyntheticRewards(cfg)) != scorer_key(other)


def test_tokenize_for_scoring_rejects_no_room_for_the_response(task):
  _, _, tok = task
  with pytest.raises(ValueError, match="leaves no room for a response"):
    tokenize_for_scoring(tok, ["hi"], ["there"], max_prompt_len=16, max_len=16)


def test_norm_json_is_refit_when_the_data_or_scorers_change(tmp_path):
  """W/norm.json is keyed on the scorers, method, objectives and training responses: a stale file
  (another task seed in the same workdir, or a file without a fingerprint) is fit again, not reused."""
  import json

  from pro_jax.configs import load_config
  from pro_jax.stages.context import load_context, responses_of

  def ctx_for(seed):
    return load_context(load_config("demo", ["--config.task.n_train=40", "--config.task.n_eval=8",
                                             f"--config.seed={seed}"]), str(tmp_path))

  def fit(ctx):
    rows = [(ex["prompt"], r) for ex in ctx.train for r in responses_of(ex)]
    return fit_norm_stats(ctx.score([p for p, _ in rows], [r for _, r in rows]), ctx.objectives)

  a = ctx_for(0)
  na = a.norm
  np.testing.assert_allclose(na.loc, fit(a).loc, rtol=1e-6)
  again = ctx_for(0)
  np.testing.assert_allclose(again.norm.loc, na.loc, rtol=1e-6)  # same fingerprint: reused
  b = ctx_for(1)  # other data (and scorer config) in the same workdir
  assert b.norm.loc.tolist() != na.loc.tolist()
  np.testing.assert_allclose(b.norm.loc, fit(b).loc, rtol=1e-6)
  # an old file without a fingerprint (or one edited by hand) is not trusted
  d = json.loads((tmp_path / "norm.json").read_text())
  d.pop("fingerprint")
  d["loc"] = [9.0, 9.0, 9.0]
  (tmp_path / "norm.json").write_text(json.dumps(d))
  np.testing.assert_allclose(ctx_for(1).norm.loc, fit(b).loc, rtol=1e-6)
