"""Validation: the malformed-input corpus (tests/data_corpus) in strict and lenient mode, and
direct checks of ``validate_example``.

Each corpus file holds a few good rows and ONE bad row. Strict mode must raise a DataError naming
exactly that file, row (line number) and field; lenient mode must drop exactly that row, count it
under the expected reason and keep every good row (checked by their ids).
"""

from __future__ import annotations

import collections
import copy
import math
import pathlib

import pytest

from pro_jax.data import schema, sources
from pro_jax.data.builders.generic import GenericConfig
from pro_jax.data.errors import DataError
from pro_jax.data.validate import (REASONS, RowPolicy, ValidationReport, check_length,
                                   validate_example)

CORPUS = pathlib.Path(__file__).parent / "data_corpus"

GENERIC = {
    "pairs": dict(columns={"id": "uid", "prompt": "question", "chosen": "answer_good",
                           "rejected": "answer_bad"},
                  objectives=["helpful", "safe"], pair_objectives=[1, 0]),
    "pairs_axes": dict(columns={"id": "uid", "prompt": "question", "chosen": "answer_good",
                                "rejected": "answer_bad", "pair_objectives": "axes"},
                       objectives=["helpful", "safe"]),
    "turns": dict(columns={"id": "uid", "prompt": "turns", "chosen": "answer_good",
                           "rejected": "answer_bad"}, objectives=["helpful"]),
    "lists": dict(columns={"id": "uid", "prompt": "question", "responses": "answers",
                           "scores": "grades"}, objectives=["a", "b", "c"]),
    "scored": dict(columns={"prompt": "question", "response": "answer"},
                   objectives=["help", "safe"], score_columns={"help": "help", "safe": "safe"},
                   pair_by="help"),
}


def words(prompt, response) -> int:
  """A stand-in tokenizer length: whitespace words of the prompt turns plus the response."""
  return sum(len(t["content"].split()) for t in prompt) + len(response.split())


# file, dataset, split, bad row, field (None: the whole line), reason, ids kept in lenient mode
# (ids are "<file>:<row>" except for generic configs with an id column).
CASES = [
    ("hh_missing_rejected.jsonl", "hh_rlhf/harmless-base", "test", 2, "rejected", "missing_field", [1, 3]),
    ("hh_empty_reply.jsonl", "hh_rlhf/harmless-base", "test", 3, "chosen", "empty_field", [1, 2]),
    ("hh_identical.jsonl", "hh_rlhf/harmless-base", "test", 2, "rejected", "chosen_equals_rejected", [1, 3]),
    ("hh_prefix_mismatch.jsonl", "hh_rlhf/harmless-base", "test", 2, "rejected", "prefix_mismatch", [1, 3]),
    ("hh_not_json.jsonl", "hh_rlhf/harmless-base", "test", 2, None, "malformed_json", [1, 3]),
    ("hh_wrong_type.jsonl", "hh_rlhf/harmless-base", "test", 1, "chosen", "wrong_type", [2, 3]),
    ("hh_bad_utf8.jsonl", "hh_rlhf/harmless-base", "test", 2, "chosen", "undecodable_text", [1, 3]),
    ("hh_lone_surrogate.jsonl", "hh_rlhf/harmless-base", "test", 3, "rejected", "undecodable_text", [1, 2]),
    ("hh_no_assistant.jsonl", "hh_rlhf/harmless-base", "test", 3, "chosen", "malformed_transcript", [1, 2]),
    ("hh_prompt_ends_assistant.jsonl", "hh_rlhf/harmless-base", "test", 2, "prompt[1].role",
     "prompt_not_ending_with_user", [1]),
    ("uf_raw_nan_rating.jsonl", "ultrafeedback/raw", "train", 2,
     "completions[1].annotations.honesty.Rating", "non_finite_score", [1, 3]),
    ("uf_raw_bad_rating.jsonl", "ultrafeedback/raw", "train", 3,
     "completions[0].annotations.truthfulness.Rating", "wrong_type", [1, 2]),
    ("uf_raw_missing_instruction.jsonl", "ultrafeedback/raw", "train", 1, "instruction", "missing_field", [2, 3]),
    ("uf_raw_empty_response.jsonl", "ultrafeedback/raw", "train", 2, "completions[2].response", "empty_field", [1, 3]),
    ("uf_bin_inf_rating.jsonl", "ultrafeedback/binarized", "train", 2, "metadata.rating_chosen",
     "non_finite_score", [1, 3]),
    ("uf_bin_missing_metadata.jsonl", "ultrafeedback/binarized", "train", 3, "metadata.rating_chosen",
     "missing_field", [1, 2]),
    ("uf_bin_prompt_list.jsonl", "ultrafeedback/binarized", "train", 1, "prompt", "wrong_type", [2, 3]),
    ("uf_bin_identical.jsonl", "ultrafeedback/binarized", "train", 2, "rejected", "chosen_equals_rejected", [1, 3]),
    ("hs2_hf_missing_score.jsonl", "helpsteer2/hf", "train", 2, "verbosity", "missing_field", [1, 3]),
    ("hs2_hf_string_score.jsonl", "helpsteer2/hf", "train", 3, "helpfulness", "wrong_type", [1, 4]),
    ("hs2_hf_empty_response.jsonl", "helpsteer2/hf", "train", 4, "response", "empty_field", [1, 3]),
    ("hs2_steerlm_label_8.jsonl", "helpsteer2/steerlm", "test", 2, "label", "wrong_num_objectives", [1]),
    ("hs2_steerlm_unknown_role.jsonl", "helpsteer2/steerlm", "test", 3, "text", "unknown_role", [1]),
    ("hs2_steerlm_no_end.jsonl", "helpsteer2/steerlm", "test", 1, "text", "malformed_transcript", [2]),
    ("hs2_steerlm_nan_label.jsonl", "helpsteer2/steerlm", "test", 3, "label[6]", "non_finite_score", [1]),
    ("sum_bad_choice.json", "summarize_from_feedback/comparisons", "train", 2, "choice", "wrong_type", [1]),
    ("sum_missing_post.json", "summarize_from_feedback/comparisons", "train", 2, "info.post", "missing_field", [1]),
    ("sum_one_summary.json", "summarize_from_feedback/comparisons", "train", 2, "summaries", "wrong_shape", [1]),
    ("sum_unknown_split.json", "summarize_from_feedback/comparisons", "train", 2, "split", "unknown_split", [1]),
    ("gen_unknown_role.jsonl", "generic:turns", "train", 2, "turns[1].role", "unknown_role", ["q1"]),
    ("gen_prompt_ends_assistant.jsonl", "generic:turns", "train", 3, "turns[1].role",
     "prompt_not_ending_with_user", ["q1", "q2"]),
    ("gen_scores_width.jsonl", "generic:lists", "train", 2, "grades[1]", "wrong_num_objectives", ["r1"]),
    ("gen_pair_objectives_len.jsonl", "generic:pairs_axes", "train", 2, "axes",
     "wrong_num_objectives", ["q1", "q3"]),
    ("gen_duplicate_id.jsonl", "generic:pairs", "train", 3, "uid", "duplicate_id", ["q1", "q2"]),
    ("gen_nan_score.jsonl", "generic:scored", "train", 2, "help", "non_finite_score", [1, 4]),
    ("gen_null_chosen.parquet", "generic:pairs", "train", 2, "answer_good", "missing_field", ["p1", "p3"]),
    ("gen_too_long.jsonl", "generic:pairs", "train", 2, "answer_good", "too_long", ["q1", "q3"]),
]
IDS = [case[0] for case in CASES]


def _load(case, mode):
  file, dataset, split = case[:3]
  kwargs = {}
  if dataset.startswith("generic:"):
    name = dataset.split(":")[1]
    kwargs["config"] = GenericConfig(name=name, **GENERIC[name])
    dataset = "generic_preferences"
  if file == "gen_too_long.jsonl":
    kwargs.update(max_tokens=6, count_tokens=words)
  return sources.load_examples(dataset, split, manual_dir=str(CORPUS), files={split: [file]},
                               mode=mode, **kwargs)


def _rows_in(file: str, split: str) -> int:
  """Input rows of the split in a corpus file (non-blank lines; parquet: 3 rows)."""
  if file.endswith(".parquet"):
    return 3
  lines = [l for l in (CORPUS / file).read_bytes().splitlines() if l.strip()]
  if file.startswith("sum_"):
    return sum(f'"split": "{split}"'.encode() in l or b'"split": "dev"' in l for l in lines)
  return len(lines)


def test_corpus_size_and_coverage():
  bad_files = sorted(p.name for p in CORPUS.iterdir() if p.is_file() and "_good" not in p.name
                     and p.suffix in (".jsonl", ".json", ".parquet"))
  assert len(bad_files) >= 20
  assert bad_files == sorted(IDS)  # every malformed file has a case, and only one
  formats = {case[1].split("/")[0].split(":")[0] for case in CASES}
  assert formats == {"hh_rlhf", "ultrafeedback", "helpsteer2", "summarize_from_feedback", "generic"}
  assert {case[1] for case in CASES} >= {"ultrafeedback/raw", "ultrafeedback/binarized",
                                         "helpsteer2/hf", "helpsteer2/steerlm"}
  for case in CASES:
    assert case[5] in REASONS


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_corpus_strict_names_file_row_field(case):
  file, _, _, row, field, reason, _ = case
  with pytest.raises(DataError) as info:
    _load(case, "strict")
  err = info.value
  path = str(CORPUS / file)
  assert (err.file, err.row, err.field, err.reason) == (path, row, field, reason)
  where = f"{path}: row {row}" + (f": field {field!r}" if field is not None else "")
  assert str(err).startswith(where + ": "), str(err)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_corpus_lenient_drops_and_counts(case):
  file, _, split, row, _, reason, kept = case
  examples = _load(case, "lenient")
  report = examples.report
  assert report.counts == collections.Counter({reason: 1})
  assert report.dropped_rows == [(str(CORPUS / file), row, reason)]
  assert report.rows_read == _rows_in(file, split)
  assert report.examples == len(examples)
  expected_ids = [k if isinstance(k, str) else f"{file}:{k}" for k in kept]
  assert [ex["id"] for ex in examples] == expected_ids
  assert reason in report.summary() and "1 dropped" in report.summary()
  for ex in examples:
    validate_example(ex)  # what lenient mode keeps is valid


def test_lenient_counts_several_reasons_in_one_read(tmp_path):
  lines = (CORPUS / "hh_identical.jsonl").read_text().splitlines()
  lines += (CORPUS / "hh_empty_reply.jsonl").read_text().splitlines()
  lines += (CORPUS / "hh_not_json.jsonl").read_text().splitlines()
  (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
  examples = sources.load_examples("hh_rlhf/helpful-base", "test", manual_dir=str(tmp_path),
                                   files={"test": ["mixed.jsonl"]}, mode="lenient")
  assert examples.report.counts == {"chosen_equals_rejected": 1, "empty_field": 1,
                                    "malformed_json": 1}
  assert (examples.report.rows_read, examples.report.rows_kept) == (9, 6)
  assert [ex["id"] for ex in examples] == [f"mixed.jsonl:{r}" for r in (1, 3, 4, 5, 7, 9)]


# ---------------------------------------------------------------------------------------------
# validate_example directly

GOOD = schema.make_example(
    id="x:1", source="test", objectives=["a", "b"],
    prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    chosen="Hello", rejected="Go away", pair_objectives=[1.0, 0.0],
    responses=["Hello", "Go away"], scores=[[4.0, 0.0], [1.0, 2.0]],
    score_mask=[[1.0, 0.0], [1.0, 1.0]])


def _bad(**changes):
  ex = copy.deepcopy(GOOD)
  for key, value in changes.items():
    ex[key] = value
  return ex


def test_good_example_passes():
  validate_example(GOOD)


def test_signed_pair_labels_pass():
  """-1 = the rejected response is preferred on that objective (a label oriented by objective)."""
  validate_example(_bad(pair_objectives=[1.0, -1.0]))
  validate_example(_bad(pair_objectives=[0.0, -1.0]))


@pytest.mark.parametrize("changes, field, reason", [
    (dict(id=""), "id", "empty_field"),
    (dict(source=None), "source", "missing_field"),
    (dict(objectives=[]), "objectives", "empty_field"),
    (dict(objectives=["a", "a"]), "objectives", "wrong_num_objectives"),
    (dict(prompt=[]), "prompt", "empty_field"),
    (dict(prompt=[{"role": "user", "content": 3}]), "prompt[0].content", "wrong_type"),
    (dict(prompt=[{"role": "human", "content": "Hi"}]), "prompt[0].role", "unknown_role"),
    (dict(prompt=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
     "prompt[1].role", "prompt_not_ending_with_user"),
    (dict(prompt=[{"role": "user", "content": "caf\udcff"}]), "prompt[0].content", "undecodable_text"),
    (dict(chosen=b"\xff\xfe"), "chosen", "undecodable_text"),
    (dict(rejected="  "), "rejected", "empty_field"),
    (dict(rejected="Hello"), "rejected", "chosen_equals_rejected"),
    (dict(pair_objectives=[1.0]), "pair_objectives", "wrong_num_objectives"),
    (dict(pair_objectives=[0.5, 0.0]), "pair_objectives", "bad_pair_objectives"),
    (dict(pair_objectives=[-2.0, 1.0]), "pair_objectives", "bad_pair_objectives"),
    (dict(pair_objectives=[0.0, 0.0]), "pair_objectives", "bad_pair_objectives"),
    (dict(pair_objectives=[math.nan, 0.0]), "pair_objectives[0]", "non_finite_score"),
    (dict(responses=["Hello", ""]), "responses[1]", "empty_field"),
    (dict(scores=[[4.0, 0.0]]), "scores", "wrong_shape"),
    (dict(scores=[[4.0, 0.0], [1.0]]), "scores[1]", "wrong_num_objectives"),
    (dict(scores=[[4.0, 0.0], [1.0, math.inf]]), "scores[1][1]", "non_finite_score"),
    (dict(scores=[[4.0, 0.0], ["1", 2.0]]), "scores[1][0]", "wrong_type"),
    (dict(score_mask=[[1.0, 0.0], [1.0, 2.0]]), "score_mask[1][1]", "bad_score_mask"),
    (dict(scores=[[4.0, 3.0], [1.0, 2.0]]), "scores[0][1]", "bad_score_mask"),
    (dict(chosen="", rejected="", pair_objectives=[0, 0], responses=[], scores=[], score_mask=[]),
     "chosen", "no_preference_data"),
])
def test_validate_example_rejects(changes, field, reason):
  with pytest.raises(DataError) as info:
    validate_example(_bad(**changes), file="f.jsonl", row=7)
  assert (info.value.field, info.value.reason, info.value.row) == (field, reason, 7)
  assert str(info.value).startswith(f"f.jsonl: row 7: field {field!r}: ")


def test_missing_field_named():
  ex = _bad()
  del ex["score_mask"]
  with pytest.raises(DataError, match="field 'score_mask': missing") as info:
    validate_example(ex)
  assert info.value.reason == "missing_field"


def test_scores_only_row_is_valid_and_pair_only_row_is_valid():
  validate_example(_bad(chosen="", rejected="", pair_objectives=[0.0, 0.0]))
  validate_example(_bad(responses=[], scores=[], score_mask=[]))


def test_length_hook():
  # words(GOOD): prompt "Be brief." + "Hi" = 3 words; chosen "Hello" 1; rejected "Go away" 2
  validate_example(GOOD, max_tokens=5, count_tokens=words)
  with pytest.raises(DataError) as info:
    validate_example(GOOD, max_tokens=4, count_tokens=words, file="f", row=2)
  assert (info.value.field, info.value.reason) == ("rejected", "too_long")
  assert "5 tokens" in str(info.value) and "max_tokens=4" in str(info.value)
  ex = _bad(responses=["Hello", "Go away", "a b c"], scores=[[1, 0], [1, 0], [1, 0]],
            score_mask=[[1, 0], [1, 0], [1, 0]])
  with pytest.raises(DataError) as info:
    check_length(ex, count_tokens=words, max_tokens=5)
  assert info.value.field == "responses[2]"
  with pytest.raises(ValueError, match="both"):
    validate_example(GOOD, max_tokens=4)


def test_policy_strict_raises_lenient_counts_once_per_row():
  err = DataError("bad", file="f", row=3, field="x", reason="wrong_type")
  with pytest.raises(DataError):
    RowPolicy("strict").reject(err)
  policy = RowPolicy("lenient")
  policy.reject(err)
  policy.reject(DataError("again", file="f", row=3, reason="empty_field"))  # same row: once
  policy.reject(DataError("other", file="f", row=4, reason="wrong_type"))
  assert policy.report.counts == {"wrong_type": 2}
  assert policy.report.first["wrong_type"] == "f: row 3: field 'x': bad"
  with pytest.raises(ValueError, match="mode"):
    RowPolicy("loose")


def test_report_summary_and_merge():
  a = ValidationReport(mode="lenient", rows_read=5, rows_kept=4, examples=4)
  a.counts["empty_field"] = 1
  a.first["empty_field"] = "f: row 2: field 'chosen': empty text"
  b = ValidationReport(mode="lenient", rows_read=3, rows_kept=1, examples=1)
  b.counts.update({"empty_field": 1, "too_long": 1})
  b.first.update({"empty_field": "g", "too_long": "h"})
  a.merge(b)
  assert (a.rows_read, a.rows_kept, a.examples, a.dropped) == (8, 5, 5, 3)
  assert a.to_dict()["dropped"] == {"empty_field": 2, "too_long": 1}
  lines = a.summary().splitlines()
  assert lines[0] == "8 rows read, 5 kept, 3 dropped, 5 examples (lenient mode)"
  assert lines[1] == "  empty_field: 2  (first: f: row 2: field 'chosen': empty text)"
  assert lines[2] == "  too_long: 1  (first: h)"
