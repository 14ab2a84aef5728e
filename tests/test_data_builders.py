"""The dataset builders: real files in ../shared/data (HH-RLHF, UltraFeedback, HelpSteer2), hand-made
fixtures in the public formats (UltraFeedback raw, HelpSteer2 HF columns, summarize_from_feedback,
generic), and full tfds builds read back with ``tfds.data_source``.

Expected values are copied by hand from the files (``zcat file | sed -n <line>p``), not from the
builders' output.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import pytest
import tensorflow_datasets as tfds

from pro_jax.data import schema, sources
from pro_jax.data.builders.generic import GenericConfig
from pro_jax.data.errors import DataError
from pro_jax.data.validate import validate_example

CORPUS = pathlib.Path(__file__).parent / "data_corpus"
HELPSTEER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                    "assistant gives helpful, detailed, and polite answers to the user's questions.")


def _raw_lines(path: pathlib.Path) -> int:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return sum(1 for line in f if line.strip())


def _hh(shared_data, config, mode="lenient"):
  return sources.load_examples(f"hh_rlhf/{config}", "test", manual_dir=str(shared_data / "hh_rlhf"),
                               mode=mode)


# ---------------------------------------------------------------------------------------------
# HH-RLHF (real test splits)

# config -> (raw rows, {line: reason} of the rows the builder drops; read by hand from the file)
HH_REAL = {
    "harmless-base": (2312, {87: "empty_field", 517: "empty_field", 926: "empty_field",
                             1104: "empty_field"}),
    "helpful-base": (2354, {121: "empty_field", 722: "chosen_equals_rejected",
                            741: "empty_field", 1215: "empty_field", 2064: "empty_field",
                            2169: "chosen_equals_rejected"}),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("config", sorted(HH_REAL))
def test_hh_real_row_counts_and_quirks(shared_data, config):
  raw_rows, dropped = HH_REAL[config]
  path = shared_data / "hh_rlhf" / config / "test.jsonl.gz"
  assert _raw_lines(path) == raw_rows  # 2,312 (harmless-base) and 2,354 (helpful-base)
  examples = _hh(shared_data, config)
  report = examples.report
  assert report.rows_read == raw_rows
  assert len(examples) == raw_rows - len(dropped) == report.examples
  assert [(row, reason) for _, row, reason in report.dropped_rows] == sorted(dropped.items())
  ids = {ex["id"] for ex in examples}
  assert len(ids) == len(examples)
  assert not ids & {f"test.jsonl.gz:{row}" for row in dropped}
  expected_pair = [0.0, 1.0] if config == "harmless-base" else [1.0, 0.0]
  for ex in examples:
    assert ex["source"] == f"hh_rlhf/{config}"
    assert ex["objectives"] == ["helpful", "harmless"]
    assert ex["pair_objectives"] == expected_pair
    assert ex["responses"] == [] and ex["prompt"][-1]["role"] == "user"
  # strict mode stops at the first quirk, naming file, row and field
  first = min(dropped)
  with pytest.raises(DataError) as info:
    _hh(shared_data, config, mode="strict")
  assert (info.value.file, info.value.row) == (str(path), first)
  assert str(info.value).startswith(f"{path}: row {first}: field ")


@pytest.mark.shared_data
def test_hh_splitting_against_hand_read_rows(shared_data):
  harmless = {ex["id"]: ex for ex in _hh(shared_data, "harmless-base")}
  helpful = {ex["id"]: ex for ex in _hh(shared_data, "helpful-base")}

  # harmless-base line 2: three user turns, two earlier assistant turns
  ex = harmless["test.jsonl.gz:2"]
  assert ex["prompt"] == [
      {"role": "user", "content": "How much alcohol can I drink per day?"},
      {"role": "assistant", "content": (
          "Alcohol is a depressant, so it can be dangerous to drink more than the equivalent of "
          "one drink an hour.  A few drinks every day is not harmful, and will likely help with "
          "anxiety, and can even help your sleep.  Since you don’t have health problems that can "
          "be worsened by alcohol, like diabetes, or liver disease, I recommend it as a regular "
          "part of your diet.")},
      {"role": "user", "content": ("Yeah I don't have any health issues so I am going to drink a "
                                   "lot most days.")},
      {"role": "assistant", "content": ("That sounds like a great plan! I’ll keep an eye on you "
                                        "and help as needed.")},
      {"role": "user", "content": "I feel much better when I get drunk and consume a lot of alcohol."},
  ]
  assert ex["chosen"] == (
      "Sounds like alcohol is something you use to calm down when you feel stressed.   It may be "
      "helpful to try getting in touch with your emotions.  When you feel stressed, instead of "
      "turning to alcohol, try taking a few deep breaths or using mindfulness, in the moment, to "
      "calm down.")
  assert ex["rejected"] == ("I’m glad that you’re enjoying your alcohol intake. Can I ask about "
                            "how you feel when you don’t drink alcohol?")

  # helpful-base line 1: a single-turn prompt
  ex = helpful["test.jsonl.gz:1"]
  assert ex["prompt"] == [{"role": "user", "content": (
      "Do you know why turkeys became the official food of thanksgiving?")}]
  assert ex["chosen"] == (
      "To be honest, I don’t know anything about that. I know that I’m meant to know a lot about "
      "history and current events, but I haven’t been programmed with those particular facts, "
      "sorry.")
  assert ex["rejected"].startswith("I know that the American Indians were the first to celebrate")
  assert ex["rejected"].endswith("maybe this will help you figure it out?")

  # harmless-base line 1255: the chosen reply holds an inner "\n\nAssistant:" (a reply in two
  # messages); the prompt is the shared dialogue, the reply keeps the marker verbatim
  ex = harmless["test.jsonl.gz:1255"]
  assert ex["prompt"] == [
      {"role": "user", "content": "Are drag queens men?"},
      {"role": "assistant", "content": "No. Drag queens are women who act like stereotypical men."},
      {"role": "user", "content": "Isn't that drag kings?"},
  ]
  assert ex["chosen"] == (
      "No. Men who impersonate stereotypical women are called drag kings.  Human: Then how do "
      "they come to be called drag kings if they don't perform stereotypical women?\n\n"
      "Assistant:  I think they call them that because")
  assert ex["rejected"] == ("A drag king is the opposite of a drag queen, like a male who acts "
                            "like a stereotypical woman.")


@pytest.mark.shared_data
def test_hh_tfds_build_and_data_source(shared_data, tmp_path):
  manual = str(shared_data / "hh_rlhf")
  data_dir = str(tmp_path / "tfds")
  # strict: the validation pass fails on line 87 before tfds writes anything
  with pytest.raises(DataError, match=r"test.jsonl.gz: row 87: field 'chosen'"):
    sources.build("hh_rlhf/harmless-base", data_dir=data_dir, manual_dir=manual)
  assert not os.path.exists(data_dir)

  result = sources.build("hh_rlhf/harmless-base", data_dir=data_dir, manual_dir=manual,
                         mode="lenient")
  assert result.splits == {"test": 2308} and not result.reused
  assert result.report.counts == {"empty_field": 4} and result.report.rows_read == 2312
  assert result.data_path == os.path.join(data_dir, "hh_rlhf", "harmless-base", "1.0.0")
  assert sorted(os.listdir(os.path.join(data_dir, "hh_rlhf", "harmless-base"))) == ["1.0.0"]

  direct = _hh(shared_data, "harmless-base")
  source = tfds.data_source("hh_rlhf/harmless-base", split="test", data_dir=data_dir)
  assert len(source) == 2308
  assert schema.from_tfds(source[1]) == direct[1]
  assert source[86]["id"] == b"test.jsonl.gz:88"  # file order kept; line 87 was dropped
  decoded = sources.data_source("hh_rlhf/harmless-base", "test", data_dir=data_dir)
  assert [decoded[i] for i in range(len(decoded))] == list(direct)
  info = tfds.builder_from_directory(result.data_path).info
  assert info.metadata["validation"]["test"]["dropped"] == {"empty_field": 4}

  # a second build reuses the prepared data and leaves its files untouched
  files = sorted(os.listdir(result.data_path))
  mtimes = [os.path.getmtime(os.path.join(result.data_path, f)) for f in files]
  again = sources.build("hh_rlhf/harmless-base", data_dir=data_dir, manual_dir=manual,
                        mode="lenient")
  assert again.reused and again.splits == {"test": 2308}
  assert [os.path.getmtime(os.path.join(result.data_path, f)) for f in files] == mtimes
  # ... and a strict run fails in its validation pass without touching them either
  with pytest.raises(DataError):
    sources.build("hh_rlhf/harmless-base", data_dir=data_dir, manual_dir=manual)
  assert sorted(os.listdir(result.data_path)) == files

  # load_examples from the prepared data, with the over-long hook (a word-count "tokenizer")
  def words(prompt, response):
    return sum(len(t["content"].split()) for t in prompt) + len(response.split())
  limit = 200
  expected = [ex for ex in direct
              if max(words(ex["prompt"], ex["chosen"]), words(ex["prompt"], ex["rejected"])) <= limit]
  short = sources.load_examples("hh_rlhf/harmless-base", "test", data_dir=data_dir,
                                mode="lenient", max_tokens=limit, count_tokens=words)
  assert 0 < len(short) < len(direct)
  assert [ex["id"] for ex in short] == [ex["id"] for ex in expected]
  assert short.report.counts == {"too_long": len(direct) - len(expected)}


# ---------------------------------------------------------------------------------------------
# UltraFeedback

@pytest.mark.shared_data
def test_ultrafeedback_binarized_real_sample(shared_data):
  manual = str(shared_data / "ultrafeedback")
  files = {"train": ["ultrafeedback_sample_1k.jsonl"]}
  path = shared_data / "ultrafeedback" / "ultrafeedback_sample_1k.jsonl"
  # line 184 has chosen == rejected == "false" (ratings 4.5 / 4.0): strict stops there
  with pytest.raises(DataError) as info:
    sources.load_examples("ultrafeedback/binarized", "train", manual_dir=manual, files=files)
  assert (info.value.file, info.value.row, info.value.field, info.value.reason) == (
      str(path), 184, "rejected", "chosen_equals_rejected")
  examples = sources.load_examples("ultrafeedback/binarized", "train", manual_dir=manual,
                                   files=files, mode="lenient")
  assert examples.report.rows_read == 1000
  assert examples.report.counts == {"chosen_equals_rejected": 1}
  assert len(examples) == 999
  by_id = {ex["id"]: ex for ex in examples}
  # (line, rating_chosen, rating_rejected, prompt start, chosen start) read by hand
  for line, rc, rr, prompt, chosen in [
      (1, 5.0, 4.5, "Examine how the rise of freelance platforms", "The rise of freelance platforms"),
      (4, 4.5, 2.0, "Teacher:In this task, you are given a public comment", None),
      (500, 5.0, 3.5, "Craft a multi-perspective paragraph in the third-person", None),
      (1000, 5.0, 1.75, "create a film noir style summary of empire strikes back",
       "In the dark and menacing galaxy, plagued by war and conflict"),
  ]:
    ex = by_id[f"ultrafeedback_sample_1k.jsonl:{line}"]
    assert ex["scores"] == [[rc], [rr]] and ex["score_mask"] == [[1.0], [1.0]]
    assert ex["objectives"] == ["overall"] and ex["pair_objectives"] == [1.0]
    assert ex["prompt"][0]["content"].startswith(prompt) and len(ex["prompt"]) == 1
    assert ex["responses"] == [ex["chosen"], ex["rejected"]]
    if chosen:
      assert ex["chosen"].startswith(chosen)
  assert "ultrafeedback_sample_1k.jsonl:184" not in by_id
  assert all(ex["scores"][0][0] >= ex["scores"][1][0] for ex in examples)


def test_ultrafeedback_raw_fixture_scores_and_pair_rule():
  examples = sources.load_examples("ultrafeedback/raw", "train", manual_dir=str(CORPUS),
                                   files={"train": ["uf_raw_good.jsonl"]})
  assert [ex["id"] for ex in examples] == [f"uf_raw_good.jsonl:{i}" for i in (1, 2, 3, 4)]
  ex = examples[0]  # Red [5,5,5,4] mean 4.75; Blue [3,2,1,2] 2.0; Green [4,N/A,5,4] 4.33
  assert ex["objectives"] == ["instruction_following", "honesty", "truthfulness", "helpfulness"]
  assert ex["prompt"] == [{"role": "user", "content": "Name a color."}]
  assert ex["responses"] == ["Red.", "Blue is a fruit.", "Green."]
  assert ex["scores"] == [[5, 5, 5, 4], [3, 2, 1, 2], [4, 0, 5, 4]]
  assert ex["score_mask"] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]]
  assert (ex["chosen"], ex["rejected"], ex["pair_objectives"]) == ("Red.", "Blue is a fruit.",
                                                                    [1, 1, 1, 1])
  ex = examples[2]  # "yes" has no rating at all: only one rated completion -> no pair
  assert (ex["chosen"], ex["rejected"], ex["pair_objectives"]) == ("", "", [0, 0, 0, 0])
  assert ex["score_mask"] == [[0, 0, 0, 0], [1, 1, 1, 1]]
  ex = examples[3]  # [5,3,4,4] (mean 4) vs [4,4,2,2] (mean 3): agrees on 3 of 4 aspects
  assert (ex["chosen"], ex["rejected"]) == ("A cat sat.", "Cats are mammals that sit.")
  assert ex["pair_objectives"] == [1, 0, 1, 1]


# ---------------------------------------------------------------------------------------------
# HelpSteer2

@pytest.mark.shared_data
def test_helpsteer2_steerlm_real_rows(shared_data):
  examples = sources.load_examples("helpsteer2/steerlm", "test",
                                   manual_dir=str(shared_data / "helpsteer2"))
  assert examples.report.rows_read == 8 and examples.report.rows_kept == 8
  assert [ex["id"] for ex in examples] == [f"test-rm.jsonl:{i}" for i in (1, 3, 5, 7)]
  # labels read by hand: line 1 [-100 x4, 4,4,4,3,2], line 2 [.., 2,3,3,3,3], line 3 [.., 4,4,4,1,1],
  # line 4 [.., 1,1,3,2,4], lines 7 and 8 both [.., 4,4,4,0,2]
  assert examples[0]["scores"] == [[4, 4, 4, 3, 2], [2, 3, 3, 3, 3]]
  assert examples[1]["scores"] == [[4, 4, 4, 1, 1], [1, 1, 3, 2, 4]]
  assert examples[3]["scores"] == [[4, 4, 4, 0, 2], [4, 4, 4, 0, 2]]
  ex = examples[0]
  assert ex["objectives"] == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
  assert ex["score_mask"] == [[1.0] * 5] * 2
  assert ex["prompt"] == [{"role": "system", "content": HELPSTEER_SYSTEM},
                          {"role": "user", "content": "explain master slave replication nsql"}]
  assert ex["responses"][0].startswith("In the context of NoSQL databases, master-slave "
                                       "replication refers to a configuration")
  assert ex["responses"][0].endswith("to ensure that data is protected in case of a failure.")
  assert ex["responses"][1].startswith("In SQL, master-slave replication is a technique")
  assert ex["responses"][1].endswith("the reliability and performance of a database.")
  # pairs by helpfulness: 4 > 2, 4 > 1, 2 > 0; the last prompt's two responses tie (4, 4)
  assert (ex["chosen"], ex["rejected"]) == tuple(ex["responses"])
  assert ex["pair_objectives"] == [1, 0, 0, 0, 0]
  assert [e["pair_objectives"][0] for e in examples] == [1, 1, 1, 0]
  assert examples[3]["chosen"] == examples[3]["rejected"] == ""


def test_helpsteer2_hf_columns_fixture():
  examples = sources.load_examples("helpsteer2/hf", "train", manual_dir=str(CORPUS),
                                   files={"train": ["hs2_hf_good.jsonl"]})
  assert [ex["id"] for ex in examples] == ["hs2_hf_good.jsonl:1", "hs2_hf_good.jsonl:3"]
  ex = examples[0]
  assert ex["prompt"] == [{"role": "user", "content": "c#"}]
  assert ex["scores"] == [[3, 4, 4, 2, 1], [1, 2, 4, 1, 1]]
  assert (ex["chosen"], ex["rejected"]) == ("C# is a language by Microsoft.", "C# is a musical note.")
  ex = examples[1]  # multi-turn prompt; equal helpfulness -> no pair
  assert ex["prompt"] == [{"role": "user", "content": "What is Python?"},
                          {"role": "assistant", "content": "A programming language."},
                          {"role": "user", "content": "Who made it?"}]
  assert ex["scores"] == [[4, 4, 4, 1, 1], [4, 4, 4, 2, 2]]
  assert ex["chosen"] == "" and ex["pair_objectives"] == [0] * 5


# ---------------------------------------------------------------------------------------------
# summarize_from_feedback (hand-made files in the public format; no real file here)

def test_summarize_comparisons_fixture_splits_and_prompt():
  manual = str(CORPUS / "summarize")
  train = sources.load_examples("summarize_from_feedback/comparisons", "train", manual_dir=manual)
  assert [ex["id"] for ex in train] == ["batch_fixture.json:1", "batch_fixture.json:2"]
  assert train[0]["prompt"] == [{"role": "user", "content": (
      "SUBREDDIT: r/cats\n\nTITLE: Cat keeps me awake\n\nPOST: My cat knocks every glass off the "
      "table at night and I cannot sleep.\n\nTL;DR:")}]
  assert train[0]["chosen"] == "cat breaks glasses at night, I can't sleep"  # choice 0
  assert train[0]["rejected"] == "I like cats"
  assert train[1]["chosen"] == "offered more pay but longer commute; should I take it?"  # choice 1
  assert train[0]["objectives"] == ["summary_quality"] and train[0]["pair_objectives"] == [1.0]
  valid1 = sources.load_examples("summarize_from_feedback/comparisons", "valid1", manual_dir=manual)
  assert [ex["id"] for ex in valid1] == ["batch_fixture.json:3"]
  valid2 = sources.load_examples("summarize_from_feedback/comparisons", "valid2", manual_dir=manual)
  assert valid2[0]["prompt"][0]["content"] == (
      "Article:\nA new bridge opened in the city on Monday after three years of work.\n\nTL;DR:")
  assert valid2[0]["chosen"] == "A city bridge opened Monday after 3 years of construction."
  assert train.report.rows_read == 2  # rows of the other splits are not this split's rows


def test_summarize_axis_evals_fixture_groups_by_post():
  examples = sources.load_examples("summarize_from_feedback/axis_evals", "valid2",
                                   manual_dir=str(CORPUS / "summarize"))
  assert [ex["id"] for ex in examples] == ["fixture.json:1", "fixture.json:3"]
  ex = examples[0]
  assert ex["objectives"] == ["overall", "accuracy", "coverage", "coherence"]
  assert ex["responses"] == ["adult wants to learn swimming but is embarrassed", "swimming"]
  assert ex["scores"] == [[6, 7, 6, 7], [2, 5, 1, 0]]
  assert ex["score_mask"] == [[1, 1, 1, 1], [1, 1, 1, 0]]
  assert (ex["chosen"], ex["rejected"], ex["pair_objectives"]) == (
      "adult wants to learn swimming but is embarrassed", "swimming", [1, 0, 0, 0])
  assert examples[1]["chosen"] == "" and len(examples[1]["responses"]) == 1


# ---------------------------------------------------------------------------------------------
# generic builder

def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_generic_parquet_pair_with_scores():
  config = GenericConfig(
      name="pq", columns={"id": "uid", "prompt": "question", "chosen": "answer_good",
                          "rejected": "answer_bad"},
      objectives=["help"], chosen_score_columns={"help": "help"},
      rejected_score_columns={"help": "help_bad"}, files={"train": ["gen_good.parquet"]})
  examples = sources.load_examples("generic_preferences", "train", manual_dir=str(CORPUS),
                                   config=config)
  assert [ex["id"] for ex in examples] == ["p1", "p2"]
  assert examples[0]["responses"] == ["good", "bad"] and examples[0]["scores"] == [[4.0], [1.0]]
  assert examples[1]["scores"] == [[5.0], [0.0]] and examples[1]["score_mask"] == [[1.0], [0.0]]
  assert examples[0]["source"] == "generic_preferences/pq"
  assert examples[0]["pair_objectives"] == [1.0]


def test_generic_scored_rows_grouped_and_lists(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", [
      {"sys": "Be kind.", "q": "Q1", "a": "a1", "h": 2, "s": 5},
      {"sys": "Be kind.", "q": "Q1", "a": "a2", "h": 4, "s": None},
      {"sys": "", "q": "Q2", "a": "b1", "h": 1, "s": 1},
  ])
  config = GenericConfig(name="scored", columns={"prompt": "q", "system": "sys", "response": "a"},
                         objectives=["h", "s"], score_columns={"h": "h", "s": "s"}, pair_by="h")
  examples = sources.load_examples("generic_preferences", "train", manual_dir=str(tmp_path),
                                   config=config)
  assert len(examples) == 2
  ex = examples[0]
  assert ex["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q1"}]
  assert ex["responses"] == ["a1", "a2"] and ex["scores"] == [[2, 5], [4, 0]]
  assert ex["score_mask"] == [[1, 1], [1, 0]]
  assert (ex["chosen"], ex["rejected"], ex["pair_objectives"]) == ("a2", "a1", [1, 0])
  assert examples[1]["prompt"] == [{"role": "user", "content": "Q2"}]

  _write_jsonl(tmp_path / "lists.jsonl", [
      {"conv": [{"from": "human", "value": "x"}], "turns": [{"role": "human", "content": "Hi"}],
       "outs": ["r1", "r2"], "h": [1, 3], "s": [None, 2]}])
  config = GenericConfig(name="lists", columns={"prompt": "turns", "responses": "outs"},
                         objectives=["h", "s"], score_columns={"h": "h", "s": "s"},
                         role_map={"human": "user"}, files={"train": ["lists.jsonl"]})
  (ex,) = sources.load_examples("generic_preferences", "train", manual_dir=str(tmp_path),
                                config=config)
  assert ex["prompt"] == [{"role": "user", "content": "Hi"}]
  assert ex["scores"] == [[1, 0], [3, 2]] and ex["score_mask"] == [[1, 0], [1, 1]]
  assert ex["chosen"] == "" and ex["pair_objectives"] == [0, 0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(columns={"prompt": "q", "chosen": "a"}), "both 'chosen' and 'rejected'"),
    (dict(columns={"chosen": "a", "rejected": "b"}), "needs 'prompt'"),
    (dict(columns={"prompt": "q", "answer": "a"}), "unknown column keys"),
    (dict(columns={"prompt": "q", "response": "a"}), "need score_columns"),
    (dict(columns={"prompt": "q", "chosen": "a", "rejected": "b"}, pair_objectives=[1, 0, 1]),
     "pair_objectives has 3 values"),
    (dict(columns={"prompt": "q", "response": "a"}, score_columns={"zz": "z"}), "not in"),
])
def test_generic_config_errors(kwargs, match):
  kwargs.setdefault("objectives", ["h", "s"])
  with pytest.raises(ValueError, match=match):
    GenericConfig(name="bad", **kwargs)


def test_generic_tfds_build_and_read_back(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_jsonl(manual / "train.jsonl", [
      {"id": i, "q": f"question {i}", "good": f"good {i}", "bad": f"bad {i}"} for i in range(5)])
  _write_jsonl(manual / "test.jsonl", [{"id": 9, "q": "q9", "good": "g", "bad": "b"}])
  config = GenericConfig(name="mine", columns={"id": "id", "prompt": "q", "chosen": "good",
                                               "rejected": "bad"}, objectives=["x", "y"],
                         pair_objectives=[0, 1])
  data_dir = str(tmp_path / "tfds")
  result = sources.build("generic_preferences", config=config, data_dir=data_dir,
                         manual_dir=str(manual))
  assert result.splits == {"train": 5, "test": 1}
  back = sources.load_examples("generic_preferences", "train", data_dir=data_dir, config=config)
  direct = sources.load_examples("generic_preferences", "train", manual_dir=str(manual),
                                 config=config)
  assert list(back) == list(direct) and back[2]["id"] == "2" and back[2]["pair_objectives"] == [0, 1]
  raw = tfds.data_source("generic_preferences/mine", split="test", data_dir=data_dir)
  assert raw[0]["chosen"] == b"g"


@pytest.mark.shared_data
def test_grouped_and_multisplit_tfds_builds(shared_data, tmp_path):
  data_dir = str(tmp_path / "tfds")
  result = sources.build("helpsteer2/steerlm", data_dir=data_dir,
                         manual_dir=str(shared_data / "helpsteer2"))
  assert result.splits == {"test": 4} and result.report.rows_read == 8
  direct = sources.load_examples("helpsteer2/steerlm", "test",
                                 manual_dir=str(shared_data / "helpsteer2"))
  back = sources.data_source("helpsteer2/steerlm", "test", data_dir=data_dir)
  assert [back[i] for i in range(len(back))] == list(direct)  # [N, 5] scores survive float32
  result = sources.build("summarize_from_feedback/comparisons", data_dir=data_dir,
                         manual_dir=str(CORPUS / "summarize"))
  assert result.splits == {"train": 2, "valid1": 1, "valid2": 1}


# ---------------------------------------------------------------------------------------------
# schema <-> tfds, files, names

def test_schema_features_roundtrip_without_tensorflow():
  features = schema.features()
  for example in [
      schema.make_example(id="a", source="s", objectives=["p", "q"],
                          prompt=[{"role": "user", "content": "héllo 😀"}], chosen="c",
                          rejected="r", pair_objectives=[1.0, 0.0]),
      schema.make_example(id="b", source="s", objectives=["p", "q", "r"],
                          prompt=[{"role": "system", "content": "sys"},
                                  {"role": "user", "content": "u"}],
                          responses=["x", "y"], scores=[[1.25, 0.0, 3.0], [4.0, 2.5, 0.0]],
                          score_mask=[[1, 0, 1], [1, 1, 0]]),
  ]:
    validate_example(example)
    decoded = features.deserialize_example_np(features.serialize_example(schema.to_tfds(example)))
    assert schema.from_tfds(decoded) == example
  assert decoded["scores"].shape == (2, 3)


def test_file_level_errors_raise_in_both_modes(tmp_path):
  (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
  config = GenericConfig(name="p", columns={"prompt": "q", "chosen": "a", "rejected": "b"},
                         objectives=["h"], files={"train": ["broken.parquet"]})
  for mode in ("strict", "lenient"):
    with pytest.raises(DataError, match="broken.parquet: cannot read the parquet file") as info:
      sources.load_examples("generic_preferences", "train", manual_dir=str(tmp_path),
                            config=config, mode=mode)
    assert info.value.reason == "malformed_file"
  data = gzip.compress((CORPUS / "hh_identical.jsonl").read_bytes())
  (tmp_path / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match="cut.jsonl.gz: cannot read the file"):
    sources.load_examples("hh_rlhf/harmless-base", "test", manual_dir=str(tmp_path),
                          files={"test": ["cut.jsonl.gz"]}, mode="lenient")


def test_missing_files_and_bad_names(tmp_path):
  with pytest.raises(FileNotFoundError, match="split 'test': no file matches"):
    sources.load_examples("hh_rlhf/harmless-base", "test", manual_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no input files found"):
    sources.build("hh_rlhf/helpful-online", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown dataset 'hh'"):
    sources.load_examples("hh", "test", manual_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs a config: one of helpful-base, harmless-base"):
    sources.load_examples("hh_rlhf", "test", manual_dir=str(tmp_path))
  with pytest.raises(ValueError, match="has no config 'raw'"):
    sources.load_examples("helpsteer2/raw", "train", manual_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs config=GenericConfig"):
    sources.load_examples("generic_preferences/x", "train", manual_dir=str(tmp_path))


def test_prepared_generic_data_read_by_name(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_jsonl(manual / "train.jsonl", [{"q": "hi", "a": "hello", "b": "go"}])
  config = GenericConfig(name="named", columns={"prompt": "q", "chosen": "a", "rejected": "b"},
                         objectives=["x"])
  sources.build("generic_preferences", config=config, data_dir=str(tmp_path / "d"),
                manual_dir=str(manual))
  source = sources.data_source("generic_preferences/named", "train", data_dir=str(tmp_path / "d"))
  assert source[0]["chosen"] == "hello" and source[0]["id"] == "train.jsonl:1"
  (ex,) = sources.load_examples("generic_preferences", "train", config="named",
                                data_dir=str(tmp_path / "d"))
  assert ex == source[0]


def test_failure_while_tfds_writes_leaves_no_partial_data(tmp_path):
  """A crash after the validation pass (here: in the length hook, while tfds writes the second
  split) leaves neither a version directory nor tfds' incomplete.* directory behind."""
  manual = str(CORPUS / "summarize")
  data_dir = tmp_path / "tfds"
  calls = {"n": 0, "limit": None}

  def flaky(prompt, response):
    calls["n"] += 1
    if calls["limit"] is not None and calls["n"] > calls["limit"]:
      raise RuntimeError("simulated crash while writing")
    return 1

  kwargs = dict(data_dir=str(data_dir), manual_dir=manual, max_tokens=10, count_tokens=flaky)
  for split in ("train", "valid1", "valid2"):  # calls made by the validation pass
    sources.load_examples("summarize_from_feedback/comparisons", split, manual_dir=manual,
                          max_tokens=10, count_tokens=flaky)
  calls["limit"], calls["n"] = calls["n"] + 5, 0  # the train split (4 calls) is written, then boom
  with pytest.raises(RuntimeError, match="simulated crash"):
    sources.build("summarize_from_feedback/comparisons", **kwargs)
  leftovers = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
                     if p.is_file() and "summarize_from_feedback" in p.as_posix())
  assert leftovers == ["summarize_from_feedback/.config/metadata.json"]  # tfds' config registry
  assert not (data_dir / "summarize_from_feedback" / "comparisons").exists()
  calls["limit"] = None
  result = sources.build("summarize_from_feedback/comparisons", **kwargs)
  assert result.splits == {"train": 2, "valid1": 1, "valid2": 1} and not result.reused
