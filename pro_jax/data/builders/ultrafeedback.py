"""UltraFeedback (openbmb): the raw per-aspect ratings and the binarized (chosen, rejected) form.

Config ``raw`` -- the openbmb/UltraFeedback release, one JSON object per line::

  {"source": ..., "instruction": str, "models": [...],
   "completions": [{"model": ..., "principle": ..., "custom_system_prompt": ..., "response": str,
                    "annotations": {"instruction_following": {"Rating": "4", "Rationale": ...},
                                    "honesty": {"Rating": "5", ...},
                                    "truthfulness": {"Type": [...], "Rating": "3", ...},
                                    "helpfulness": {"Type": [...], "Rating": "N/A", ...}},
                    ...}, ...], ...}

  manual_dir layout: ``<manual_dir>/raw/*.jsonl`` (or ``*.jsonl.gz`` / ``*.parquet`` with the same
  columns; all files -> split "train"; UltraFeedback has no test split). An annotation given as
  a one-element list of such dicts is accepted too.

  -> prompt = [user: instruction] (the per-completion ``custom_system_prompt`` was the generation
  principle, not part of the user's prompt, and is not kept); responses = the completions;
  objectives ``["instruction_following", "honesty", "truthfulness", "helpfulness"]``;
  scores [N, 4] = the 1-5 ratings, score_mask 0 where a rating is "N/A" / absent.
  Pair rule (deterministic): each completion's mean over its annotated aspects; chosen = the
  highest mean (first in file order on ties), rejected = the lowest mean (first on ties), if
  lower than the chosen one; ``pair_objectives[k] = 1`` where both are rated on aspect k and
  chosen's rating is strictly higher. If no aspect agrees, all means tie, or the two picked
  completions have the same text, the row keeps its scored responses and has no pair.

Config ``binarized`` -- the binarized form, as in shared/data/ultrafeedback (argilla-style)::

  {"prompt": str, "chosen": str, "rejected": str,
   "metadata": {"rating_chosen": 4.75, "rating_rejected": 2.5, "source": ..., ...}}

  manual_dir layout: ``<manual_dir>/binarized/{train,test}*.jsonl[.gz]`` (or pass ``files=``).
  -> objectives ``["overall"]`` (the ratings are means over the four aspects; the per-aspect
  ratings are not in this form), pair_objectives ``[1]``, responses ``[chosen, rejected]`` with
  scores ``[[rating_chosen], [rating_rejected]]``.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

from pro_jax.data import schema
from pro_jax.data.builders.common import (PreferenceBuilder, PreferenceConfig, convert_rows, get,
                                          number, text)
from pro_jax.data.errors import DataError
from pro_jax.data.validate import RowPolicy

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
NA = ("N/A", "n/a", "NA", "")


def _rating(completion: dict, aspect: str, *, file: str, row: int) -> float | None:
  """The aspect's 1-5 rating, None when "N/A" or absent (fields relative to the completion)."""
  annotations = get(completion, "annotations", file=file, row=row)
  if not isinstance(annotations, dict):
    raise DataError(f"expected an object, got {type(annotations).__name__}", file=file, row=row,
                    field="annotations", reason="wrong_type")
  ann = annotations.get(aspect)
  if isinstance(ann, list) and len(ann) == 1:
    ann = ann[0]
  if ann is None:
    return None
  if not isinstance(ann, dict):
    raise DataError(f"expected an object with 'Rating', got {type(ann).__name__}", file=file,
                    row=row, field=f"annotations.{aspect}", reason="wrong_type")
  if ann.get("Rating") is None:
    return None
  return number(ann["Rating"], f"annotations.{aspect}.Rating", file=file, row=row, na=NA)


def choose_pair(scores: Sequence[Sequence[float]], mask: Sequence[Sequence[float]]
                ) -> tuple[int, int, list[float]] | None:
  """The raw config's pair rule (see the module doc): (chosen, rejected, pair_objectives)."""
  means = []
  for s, m in zip(scores, mask):
    rated = [x for x, w in zip(s, m) if w]
    means.append(sum(rated) / len(rated) if rated else None)
  rated_idx = [i for i, mean in enumerate(means) if mean is not None]
  if len(rated_idx) < 2:
    return None
  best = max(rated_idx, key=lambda i: (means[i], -i))
  worst = min(rated_idx, key=lambda i: (means[i], i))
  if means[worst] >= means[best]:
    return None
  pair_objectives = [1.0 if mask[best][k] and mask[worst][k] and scores[best][k] > scores[worst][k]
                     else 0.0 for k in range(len(scores[best]))]
  if not any(pair_objectives):
    return None
  return best, worst, pair_objectives


def parse_raw(obj: dict, *, file: str, row: int) -> dict:
  instruction = text(obj, "instruction", file=file, row=row)
  completions = get(obj, "completions", file=file, row=row)
  if not isinstance(completions, list):
    raise DataError(f"expected a list, got {type(completions).__name__}", file=file, row=row,
                    field="completions", reason="wrong_type")
  if not completions:
    raise DataError("no completions", file=file, row=row, field="completions",
                    reason="empty_field")
  responses, scores, mask = [], [], []
  for i, completion in enumerate(completions):
    field = f"completions[{i}]"
    if not isinstance(completion, dict):
      raise DataError(f"expected an object, got {type(completion).__name__}", file=file, row=row,
                      field=field, reason="wrong_type")
    try:
      responses.append(text(completion, "response", file=file, row=row))
      ratings = [_rating(completion, a, file=file, row=row) for a in ASPECTS]
    except DataError as err:
      raise err.located(field_prefix=field) from None
    scores.append([0.0 if r is None else r for r in ratings])
    mask.append([0.0 if r is None else 1.0 for r in ratings])
  pair = choose_pair(scores, mask)
  chosen = rejected = ""
  pair_objectives = None
  if pair is not None:
    best, worst, pair_objectives = pair
    chosen, rejected = responses[best], responses[worst]
    if chosen == rejected:  # two completions with the same text: keep the scores, no pair
      chosen = rejected = ""
      pair_objectives = None
  return schema.make_example(
      id=f"{os.path.basename(file)}:{row}", source="ultrafeedback/raw", objectives=ASPECTS,
      prompt=schema.user_prompt(instruction), chosen=chosen, rejected=rejected,
      pair_objectives=pair_objectives, responses=responses, scores=scores, score_mask=mask)


def parse_binarized(obj: dict, *, file: str, row: int) -> dict:
  prompt = text(obj, "prompt", file=file, row=row)
  chosen = text(obj, "chosen", file=file, row=row)
  rejected = text(obj, "rejected", file=file, row=row)
  ratings = [number(get(obj, f"metadata.{name}", file=file, row=row), f"metadata.{name}",
                    file=file, row=row) for name in ("rating_chosen", "rating_rejected")]
  return schema.make_example(
      id=f"{os.path.basename(file)}:{row}", source="ultrafeedback/binarized",
      objectives=["overall"], prompt=schema.user_prompt(prompt), chosen=chosen,
      rejected=rejected, pair_objectives=[1.0], responses=[chosen, rejected],
      scores=[[ratings[0]], [ratings[1]]], score_mask=[[1.0], [1.0]])


def read_split(paths: Sequence[str], split: str, config, policy: RowPolicy) -> Iterator[dict]:
  del split
  parse = parse_raw if config.name == "raw" else parse_binarized
  yield from convert_rows(paths, parse, policy)


class Ultrafeedback(PreferenceBuilder):
  """UltraFeedback, raw per-aspect ratings or binarized pairs (see the module docstring)."""

  name = "ultrafeedback"
  DESCRIPTION = "UltraFeedback: GPT-4 ratings of 4 completions per prompt on 4 aspects."
  HOMEPAGE = "https://github.com/OpenBMB/UltraFeedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("raw: put the openbmb/UltraFeedback *.jsonl files into "
                                  "<manual_dir>/raw/; binarized: <manual_dir>/binarized/"
                                  "{train,test}*.jsonl.")
  BUILDER_CONFIGS = [
      PreferenceConfig(name="raw", description="per-aspect ratings, 4 objectives",
                       files={"train": ["raw/*.jsonl", "raw/*.jsonl.gz", "raw/*.parquet"]}),
      PreferenceConfig(name="binarized", description="binarized pairs with mean ratings",
                       files={"train": ["binarized/train*.jsonl", "binarized/train*.jsonl.gz"],
                              "test": ["binarized/test*.jsonl", "binarized/test*.jsonl.gz"]}),
  ]
  read_split = staticmethod(read_split)
