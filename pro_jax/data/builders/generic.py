"""A generic builder for users' own JSONL / parquet preference data, with a column mapping.

Describe the files with a ``GenericConfig``::

  config = GenericConfig(
      name="my_prefs",                      # prepared data: <data_dir>/generic_preferences/my_prefs/
      columns={"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad"},
      objectives=["helpful", "safe"],
      pair_objectives=[1, 0],               # constant, or a column: columns["pair_objectives"]
      files={"train": ["train*.jsonl"], "test": ["test.parquet"]})   # globs under manual_dir

``columns`` maps schema parts to column names (dotted paths reach into nested objects, e.g.
``"meta.rating"``):

  prompt (required)   text -> one user turn; or a list of {"role", "content"} turns
                      (``role_map`` renames roles, e.g. {"human": "user", "gpt": "assistant"})
  system              optional text -> a leading system turn
  id                  optional; default ``<file name>:<row>``
  chosen, rejected    a pair (both or neither)
  pair_objectives     optional per-row list of K 0/1 values (else the constant ``pair_objectives``,
                      default: all ones)
  response            one scored response per row; rows with the same prompt are grouped into one
                      example (responses [N]); scores from ``score_columns`` {objective: column}
                      (scalars); ``pair_by`` = an objective name adds a (best, worst) pair on it
  responses           a list of responses per row; scores from the ``scores`` column ([N, K]) or
                      from ``score_columns`` {objective: column holding N numbers}

With a pair, ``chosen_score_columns`` / ``rejected_score_columns`` ({objective: column}) make
``responses = [chosen, rejected]`` with those scores. A null score means "not annotated"
(score_mask 0); a NaN / inf score is an error. File format by extension: ``.jsonl`` / ``.json``
(JSON lines, optionally ``.gz``) or ``.parquet`` (pyarrow, installed with tensorflow-datasets).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping, Sequence

from pro_jax.data import schema
from pro_jax.data.builders.common import (Files, PreferenceBuilder, PreferenceConfig, Scored,
                                          convert_rows, get, group_scored, number, pair_by, text)
from pro_jax.data.errors import DataError
from pro_jax.data.validate import RowPolicy, check_text

COLUMN_KEYS = ("id", "prompt", "system", "chosen", "rejected", "pair_objectives", "response",
               "responses", "scores")
DEFAULT_FILES = {split: [f"{split}*.jsonl", f"{split}*.jsonl.gz", f"{split}*.parquet"]
                 for split in ("train", "validation", "test")}


class GenericConfig(PreferenceConfig):
  """How to read one user dataset (see the module docstring for every option)."""

  def __init__(self, *, name: str, columns: Mapping[str, str], objectives: Sequence[str],
               files: Files | None = None, pair_objectives: Sequence[float] | None = None,
               score_columns: Mapping[str, str] | None = None,
               chosen_score_columns: Mapping[str, str] | None = None,
               rejected_score_columns: Mapping[str, str] | None = None,
               pair_by: str | None = None, role_map: Mapping[str, str] | None = None,
               source: str | None = None, description: str | None = None, **kwargs):
    super().__init__(name=name, files=files or DEFAULT_FILES,
                     description=description or f"user data {name}", **kwargs)
    self.columns = dict(columns)
    self.objectives = tuple(objectives)
    self.pair_objectives = (tuple(float(x) for x in pair_objectives) if pair_objectives is not None
                            else (1.0,) * len(self.objectives))
    self.score_columns = dict(score_columns or {})
    self.chosen_score_columns = dict(chosen_score_columns or {})
    self.rejected_score_columns = dict(rejected_score_columns or {})
    self.pair_by = pair_by
    self.role_map = dict(role_map or {})
    self.source = source or f"generic_preferences/{name}"
    self._check()

  def _check(self) -> None:
    def fail(msg):
      raise ValueError(f"GenericConfig {self.name!r}: {msg}")
    unknown = set(self.columns) - set(COLUMN_KEYS)
    if unknown:
      fail(f"unknown column keys {sorted(unknown)}; known: {', '.join(COLUMN_KEYS)}")
    if "prompt" not in self.columns:
      fail("columns needs 'prompt'")
    if not self.objectives:
      fail("objectives must not be empty")
    has_pair = "chosen" in self.columns or "rejected" in self.columns
    if has_pair and not ("chosen" in self.columns and "rejected" in self.columns):
      fail("a pair needs both 'chosen' and 'rejected' columns")
    if "response" in self.columns and ("responses" in self.columns or has_pair):
      fail("'response' (one scored response per row, grouped by prompt) cannot be combined "
           "with 'responses' or a pair")
    if not has_pair and "response" not in self.columns and "responses" not in self.columns:
      fail("map a pair ('chosen', 'rejected'), 'response' or 'responses'")
    if len(self.pair_objectives) != len(self.objectives):
      fail(f"pair_objectives has {len(self.pair_objectives)} values for "
           f"{len(self.objectives)} objectives")
    for what in ("score_columns", "chosen_score_columns", "rejected_score_columns"):
      extra = set(getattr(self, what)) - set(self.objectives)
      if extra:
        fail(f"{what} names objectives {sorted(extra)} not in {list(self.objectives)}")
    if bool(self.chosen_score_columns) != bool(self.rejected_score_columns):
      fail("give both chosen_score_columns and rejected_score_columns, or neither")
    if self.chosen_score_columns and not has_pair:
      fail("chosen/rejected_score_columns need a pair")
    if self.chosen_score_columns and "responses" in self.columns:
      fail("chosen/rejected_score_columns make the responses; do not also map 'responses'")
    if "response" in self.columns and not self.score_columns:
      fail("'response' rows need score_columns")
    if self.pair_by is not None:
      if "response" not in self.columns:
        fail("pair_by applies to 'response' rows (grouped by prompt)")
      if self.pair_by not in self.objectives:
        fail(f"pair_by {self.pair_by!r} is not an objective")


def _prompt(obj, config: GenericConfig, *, file: str, row: int) -> list[dict]:
  column = config.columns["prompt"]
  value = get(obj, column, file=file, row=row)
  if isinstance(value, str):
    turns = schema.user_prompt(check_text(value, column, file=file, row=row).strip())
  elif isinstance(value, list):
    turns = []
    for i, turn in enumerate(value):
      if not isinstance(turn, dict):
        raise DataError(f"expected a {{role, content}} object, got {type(turn).__name__}",
                        file=file, row=row, field=f"{column}[{i}]", reason="wrong_type")
      role = turn.get("role")
      content = turn.get("content")
      if isinstance(content, str):
        content = content.strip()
      turns.append({"role": config.role_map.get(role, role), "content": content})
  else:
    raise DataError(f"expected text or a list of turns, got {type(value).__name__}", file=file,
                    row=row, field=column, reason="wrong_type")
  if "system" in config.columns:
    system = get(obj, config.columns["system"], file=file, row=row, required=False)
    if system is not None:
      system = check_text(system, config.columns["system"], file=file, row=row, allow_empty=True)
      if system.strip():
        turns = [{"role": "system", "content": system.strip()}] + turns
  return turns


def _scores(obj, columns: Mapping[str, str], objectives: Sequence[str], *, file: str, row: int
            ) -> tuple[list[float], list[float]]:
  scores, mask = [], []
  for name in objectives:
    value = get(obj, columns[name], file=file, row=row, required=False) if name in columns else None
    value = None if value is None else number(value, columns[name], file=file, row=row)
    scores.append(0.0 if value is None else value)
    mask.append(0.0 if value is None else 1.0)
  return scores, mask


def _row_id(obj, config: GenericConfig, *, file: str, row: int) -> str:
  if "id" not in config.columns:
    return f"{os.path.basename(file)}:{row}"
  value = get(obj, config.columns["id"], file=file, row=row)
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise DataError(f"expected text or an integer, got {type(value).__name__}", file=file, row=row,
                    field=config.columns["id"], reason="wrong_type")
  return str(value)


def parse_row(obj: dict, *, file: str, row: int, config: GenericConfig) -> dict:
  """A pair and/or a list of responses per row."""
  cols = config.columns
  prompt = _prompt(obj, config, file=file, row=row)
  chosen = rejected = ""
  pair_objectives = None
  responses, scores, mask = [], [], []
  if "chosen" in cols:
    chosen = text(obj, cols["chosen"], file=file, row=row)
    rejected = text(obj, cols["rejected"], file=file, row=row)
    if "pair_objectives" in cols:
      value = get(obj, cols["pair_objectives"], file=file, row=row)
      if not isinstance(value, list):
        raise DataError(f"expected a list, got {type(value).__name__}", file=file, row=row,
                        field=cols["pair_objectives"], reason="wrong_type")
      pair_objectives = [number(x, f"{cols['pair_objectives']}[{i}]", file=file, row=row)
                         for i, x in enumerate(value)]
    else:
      pair_objectives = list(config.pair_objectives)
    if config.chosen_score_columns:
      responses = [chosen, rejected]
      for columns in (config.chosen_score_columns, config.rejected_score_columns):
        s, m = _scores(obj, columns, config.objectives, file=file, row=row)
        scores.append(s)
        mask.append(m)
  if "responses" in cols:
    value = get(obj, cols["responses"], file=file, row=row)
    if not isinstance(value, list):
      raise DataError(f"expected a list, got {type(value).__name__}", file=file, row=row,
                      field=cols["responses"], reason="wrong_type")
    responses = [check_text(r, f"{cols['responses']}[{i}]", file=file, row=row).strip()
                 for i, r in enumerate(value)]
    n, k = len(responses), len(config.objectives)
    if "scores" in cols:
      matrix = get(obj, cols["scores"], file=file, row=row)
      if not isinstance(matrix, list) or len(matrix) != n:
        raise DataError(f"expected a list of {n} score lists (one per response)", file=file,
                        row=row, field=cols["scores"], reason="wrong_shape")
      scores, mask = [], []
      for i, line in enumerate(matrix):
        if not isinstance(line, list) or len(line) != k:
          raise DataError(f"expected {k} scores ({', '.join(config.objectives)})", file=file,
                          row=row, field=f"{cols['scores']}[{i}]", reason="wrong_num_objectives")
        vals = [None if x is None else number(x, f"{cols['scores']}[{i}][{j}]", file=file, row=row)
                for j, x in enumerate(line)]
        scores.append([0.0 if v is None else v for v in vals])
        mask.append([0.0 if v is None else 1.0 for v in vals])
    else:
      scores, mask = [[0.0] * k for _ in range(n)], [[0.0] * k for _ in range(n)]
      for j, name in enumerate(config.objectives):
        if name not in config.score_columns:
          continue
        column = config.score_columns[name]
        values = get(obj, column, file=file, row=row, required=False)
        if values is None:
          continue
        if not isinstance(values, list) or len(values) != n:
          raise DataError(f"expected a list of {n} scores (one per response)", file=file, row=row,
                          field=column, reason="wrong_shape")
        for i, x in enumerate(values):
          if x is not None:
            scores[i][j] = number(x, f"{column}[{i}]", file=file, row=row)
            mask[i][j] = 1.0
  return schema.make_example(
      id=_row_id(obj, config, file=file, row=row), source=config.source,
      objectives=config.objectives, prompt=prompt, chosen=chosen, rejected=rejected,
      pair_objectives=pair_objectives, responses=responses, scores=scores, score_mask=mask)


def parse_scored(obj: dict, *, file: str, row: int, config: GenericConfig) -> Scored:
  """One scored response per row (grouped by prompt afterwards)."""
  prompt = _prompt(obj, config, file=file, row=row)
  response = text(obj, config.columns["response"], file=file, row=row)
  scores, mask = _scores(obj, config.score_columns, config.objectives, file=file, row=row)
  key = repr([(t["role"], t["content"]) for t in prompt])
  return Scored(key=key, prompt=prompt, response=response, scores=scores, mask=mask, file=file,
                row=row)


_INDEXED = re.compile(r"^(?P<name>[a-z_]+)(?:\[(?P<i>\d+)\])?(?:\[(?P<j>\d+)\])?(?P<rest>.*)$")


def user_field(field: str | None, obj: Any, config: GenericConfig) -> str | None:
  """The user's column for a schema field a validation error names: ``prompt[1].role`` -> ``q[1].role``
  (shifted when a ``system`` column added a leading turn), ``chosen`` -> the chosen column, ...
  Fields with no column of their own (objectives, source) are named as the GenericConfig option."""
  if field is None:
    return None
  m = _INDEXED.match(field)
  if m is None:
    return field
  name, i, j, rest = m["name"], m["i"], m["j"], m["rest"]
  cols = config.columns
  if name == "prompt":
    system = cols.get("system")
    raw_system = get(obj, system, file="", row=0, required=False) if system else None
    offset = 1 if isinstance(raw_system, str) and raw_system.strip() else 0
    if i is None:
      return cols["prompt"]
    if int(i) < offset:
      return system
    if isinstance(get(obj, cols["prompt"], file="", row=0, required=False), str):
      return cols["prompt"]  # one text -> one user turn
    return f"{cols['prompt']}[{int(i) - offset}]{rest}"
  if name in ("chosen", "rejected", "id") and name in cols:
    return cols[name] + rest
  if name == "pair_objectives":
    return (cols["pair_objectives"] if "pair_objectives" in cols else "GenericConfig.pair_objectives") + \
        (f"[{i}]" if i is not None else "")
  if name == "responses" and i is not None:
    if "response" in cols:  # one scored response per row (checked alone, before grouping)
      return cols["response"]
    if "responses" in cols:
      return f"{cols['responses']}[{i}]"
    if config.chosen_score_columns and int(i) < 2:
      return cols["chosen" if int(i) == 0 else "rejected"]
  if name in ("scores", "score_mask") and i is not None:
    if "scores" in cols:
      return f"{cols['scores']}[{i}]" + (f"[{j}]" if j is not None else "")
    if j is not None:
      objective = config.objectives[int(j)]
      if config.chosen_score_columns and int(i) < 2:
        by = config.chosen_score_columns if int(i) == 0 else config.rejected_score_columns
        return by.get(objective, field)
      if objective in config.score_columns:
        return config.score_columns[objective] + ("" if "response" in cols else f"[{i}]")
  if name in ("objectives", "source"):
    return f"GenericConfig.{name}"
  return field


def read_split(paths: Sequence[str], split: str, config: GenericConfig,
               policy: RowPolicy) -> Iterator[dict]:
  del split
  if "response" in config.columns:
    make_pair = pair_by(config.objectives.index(config.pair_by)) if config.pair_by else None
    yield from group_scored(
        paths, lambda obj, file, row: parse_scored(obj, file=file, row=row, config=config),
        policy, source=config.source, objectives=config.objectives, make_pair=make_pair,
        user_field=lambda field, obj: user_field(field, obj, config))
  else:
    yield from convert_rows(
        paths, lambda obj, file, row: parse_row(obj, file=file, row=row, config=config), policy,
        user_field=lambda field, obj: user_field(field, obj, config))


class GenericPreferences(PreferenceBuilder):
  """Users' own JSONL / parquet data; pass ``config=GenericConfig(...)`` (see the module doc)."""

  name = "generic_preferences"
  DESCRIPTION = "User preference data read through a column mapping (GenericConfig)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the files named by GenericConfig.files into manual_dir."
  BUILDER_CONFIGS: list = []
  read_split = staticmethod(read_split)

  def __init__(self, *, config: GenericConfig | None = None, **kwargs):
    if not isinstance(config, GenericConfig):
      raise ValueError("generic_preferences needs config=GenericConfig(...) (got "
                       f"{type(config).__name__})")
    super().__init__(config=config, **kwargs)
