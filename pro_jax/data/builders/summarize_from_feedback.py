"""OpenAI "Learning to summarize from human feedback": TL;DR summary comparisons (and axis evals).

Config ``comparisons`` -- ``comparisons/batch*.json`` of the release (JSON lines despite the
name), one comparison per line::

  {"info": {"id": "t3_2vwp1w", "post": str, "title": str, "subreddit": "legaladvice"},
   "summaries": [{"text": " ...", "policy": ..., "note": ...}, {"text": ...}],
   "choice": 1, "worker": ..., "batch": "batch9", "split": "train", "extra": {"confidence": 8}}

  manual_dir layout: ``<manual_dir>/comparisons/*.json``. Every file holds rows of several
  splits; a row goes to the tfds split named by its own ``split`` field: ``train``, ``valid1``
  (used for model selection in the paper) or ``valid2`` (final evaluation).
  -> prompt = one user turn in the paper's TL;DR query format::

    SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:

  (rows whose ``info`` holds a CNN/DM ``article`` instead of a post use
  ``Article:\\n{article}\\n\\nTL;DR:``); chosen = ``summaries[choice].text``, rejected = the other
  (stripped; the release's summaries start with a space). Objectives ``["summary_quality"]``,
  pair_objectives ``[1]``, no scored responses.

Config ``axis_evals`` -- ``axis_evals/*.json``: one rated summary per line, with 1-7 Likert
scores ``summary.axes = {overall, accuracy, coverage, coherence}`` (splits by the row's
``split``: valid1, valid2, test). Summaries of the same post (``info.id``) are grouped into one
example: responses [N], scores [N, 4] on objectives ``["overall", "accuracy", "coverage",
"coherence"]`` (score_mask 0 for a missing axis), plus a pair by the ``overall`` score (highest vs
lowest, pair_objectives ``[1, 0, 0, 0]``). This is what the axis evaluations add to the
comparisons: several objectives per summary instead of one preference.

No file of this dataset is in shared/data: the tests use small hand-made files in the public
format (tests/data_corpus/summarize/).
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

from pro_jax.data import schema
from pro_jax.data.builders.common import (PreferenceBuilder, PreferenceConfig, Scored,
                                          convert_rows, get, group_scored, number, pair_by, text)
from pro_jax.data.errors import DataError
from pro_jax.data.validate import RowPolicy

TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_FORMAT = "Article:\n{article}\n\nTL;DR:"
AXES = ("overall", "accuracy", "coverage", "coherence")
COMPARISON_SPLITS = ("train", "valid1", "valid2")
AXIS_SPLITS = ("valid1", "valid2", "test")


def query(info, *, file: str, row: int) -> str:
  """The paper's query text for a post (TL;DR) or an article (CNN/DM)."""
  if not isinstance(info, dict):
    raise DataError(f"expected an object, got {type(info).__name__}", file=file, row=row,
                    field="info", reason="wrong_type")
  if info.get("article") is not None and info.get("post") is None:
    return CNNDM_FORMAT.format(article=text(info, "article", file=file, row=row))
  try:
    fields = {name: text(info, name, file=file, row=row)
              for name in ("post", "title", "subreddit")}
  except DataError as err:
    raise err.located(field_prefix="info") from None
  return TLDR_FORMAT.format(**fields)


def _split_filter(split: str, known: Sequence[str]):
  def keep(obj, *, file, row) -> bool:
    value = get(obj, "split", file=file, row=row)
    if value not in known:
      raise DataError(f"unknown split {value!r} (expected one of {', '.join(known)})", file=file,
                      row=row, field="split", reason="unknown_split")
    return value == split
  return keep


def parse_comparison(obj: dict, *, file: str, row: int) -> dict:
  prompt = query(get(obj, "info", file=file, row=row), file=file, row=row)
  summaries = get(obj, "summaries", file=file, row=row)
  if not isinstance(summaries, list):
    raise DataError(f"expected a list, got {type(summaries).__name__}", file=file, row=row,
                    field="summaries", reason="wrong_type")
  if len(summaries) != 2:
    raise DataError(f"{len(summaries)} summaries, expected 2", file=file, row=row,
                    field="summaries", reason="wrong_shape")
  texts = []
  for i, summary in enumerate(summaries):
    if not isinstance(summary, dict):
      raise DataError(f"expected an object, got {type(summary).__name__}", file=file, row=row,
                      field=f"summaries[{i}]", reason="wrong_type")
    try:
      texts.append(text(summary, "text", file=file, row=row))
    except DataError as err:
      raise err.located(field_prefix=f"summaries[{i}]") from None
  choice = get(obj, "choice", file=file, row=row)
  if isinstance(choice, bool) or choice not in (0, 1):
    raise DataError(f"expected 0 or 1, got {choice!r:.40}", file=file, row=row, field="choice",
                    reason="wrong_type")
  return schema.make_example(
      id=f"{os.path.basename(file)}:{row}", source="summarize_from_feedback/comparisons",
      objectives=["summary_quality"], prompt=schema.user_prompt(prompt),
      chosen=texts[choice], rejected=texts[1 - choice], pair_objectives=[1.0])


def parse_axis_eval(obj: dict, *, file: str, row: int) -> Scored:
  info = get(obj, "info", file=file, row=row)
  prompt = query(info, file=file, row=row)
  summary = get(obj, "summary", file=file, row=row)
  if not isinstance(summary, dict):
    raise DataError(f"expected an object, got {type(summary).__name__}", file=file, row=row,
                    field="summary", reason="wrong_type")
  response = text(obj, "summary.text", file=file, row=row)
  axes = get(obj, "summary.axes", file=file, row=row)
  if not isinstance(axes, dict):
    raise DataError(f"expected an object, got {type(axes).__name__}", file=file, row=row,
                    field="summary.axes", reason="wrong_type")
  values = [None if axes.get(a) is None else
            number(axes[a], f"summary.axes.{a}", file=file, row=row) for a in AXES]
  key = str(info.get("id")) if info.get("id") is not None else prompt
  return Scored(key=key, prompt=schema.user_prompt(prompt), response=response,
                scores=[0.0 if v is None else v for v in values],
                mask=[0.0 if v is None else 1.0 for v in values], file=file, row=row)


def read_split(paths: Sequence[str], split: str, config, policy: RowPolicy) -> Iterator[dict]:
  if config.name == "comparisons":
    yield from convert_rows(paths, parse_comparison, policy,
                            keep_row=_split_filter(split, COMPARISON_SPLITS))
  else:
    yield from group_scored(paths, parse_axis_eval, policy,
                            source="summarize_from_feedback/axis_evals", objectives=AXES,
                            make_pair=pair_by(0), keep_row=_split_filter(split, AXIS_SPLITS))


class SummarizeFromFeedback(PreferenceBuilder):
  """OpenAI summarize-from-feedback comparisons / axis evals (see the module docstring)."""

  name = "summarize_from_feedback"
  DESCRIPTION = "OpenAI TL;DR summary comparisons (human preferences) and axis evaluations."
  HOMEPAGE = "https://github.com/openai/summarize-from-feedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put comparisons/*.json (and axis_evals/*.json) of "
                                  "https://openaipublic.blob.core.windows.net/"
                                  "summarize-from-feedback/dataset/ into manual_dir.")
  BUILDER_CONFIGS = [
      PreferenceConfig(name="comparisons", description="pairwise summary comparisons",
                       files={s: ["comparisons/*.json", "comparisons/*.jsonl"]
                              for s in COMPARISON_SPLITS}),
      PreferenceConfig(name="axis_evals", description="1-7 ratings on 4 axes, grouped by post",
                       files={s: ["axis_evals/*.json", "axis_evals/*.jsonl"] for s in AXIS_SPLITS}),
  ]
  read_split = staticmethod(read_split)
