"""Row validation for the preference schema (``pro_jax.data.schema``) and the lenient / strict policy.

``validate_example`` checks one schema dict and raises ``DataError`` (with file, row, field and a
``reason`` code from ``REASONS``). Builders call it for every row while reading, so bad input
stops a strict build before anything is written. ``RowPolicy`` decides what happens to a bad
row: ``mode="strict"`` re-raises, ``mode="lenient"`` drops the row and counts it by reason in a
``ValidationReport`` (logged at the end of a build / load).

The "over-long after tokenization" check needs a tokenizer, so it is a hook: pass
``count_tokens(prompt_turns, response) -> int`` and ``max_tokens`` (to ``validate_example``,
``check_length``, ``RowPolicy`` or the builders), and every (prompt, response) sequence of the row
(chosen, rejected and each scored response) must fit.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Callable, Sequence

from pro_jax.data.errors import DataError
from pro_jax.data.schema import FIELDS, ROLES

log = logging.getLogger("pro_jax.data")

CountTokens = Callable[[Sequence[dict], str], int]

# reason code -> what it means (the keys of ValidationReport.counts)
REASONS = {
    "malformed_json": "the line is not a JSON object",
    "malformed_file": "the file cannot be read in its format (e.g. a broken parquet file)",
    "empty_file": "a file holds no rows at all (an error in strict mode)",
    "malformed_transcript": "a chat transcript does not follow its format's turn markers",
    "missing_field": "a required field / column is absent or null",
    "empty_field": "a required text (or list) is empty or whitespace only",
    "wrong_type": "a value has the wrong type (e.g. a number where text is expected)",
    "non_finite_score": "a score is NaN or infinite",
    "wrong_num_objectives": "a score / pair_objectives width does not match the objectives",
    "wrong_shape": "scores / score_mask do not have one row per response",
    "bad_score_mask": "score_mask is not 0/1, or a masked-out score is not 0",
    "bad_pair_objectives": "pair_objectives is not -1/0/1, all 0 for a pair, or set without a pair",
    "undecodable_text": "text with bytes that are not UTF-8 or lone surrogates",
    "chosen_equals_rejected": "the pair's two responses are identical",
    "prompt_not_ending_with_user": "the prompt's last turn is not a user turn",
    "unknown_role": "a prompt turn has a role other than system / user / assistant",
    "prefix_mismatch": "chosen and rejected transcripts do not share the dialogue before the reply",
    "no_preference_data": "the row has neither a pair nor scored responses",
    "unknown_split": "the row's own split value is not one the config knows",
    "duplicate_id": "the id was already used by an earlier row of the split",
    "too_long": "a (prompt, response) sequence is longer than max_tokens after tokenization",
}


def _err(message: str, field: str | None, reason: str, file, row) -> DataError:
  assert reason in REASONS, reason
  return DataError(message, file=file, row=row, field=field, reason=reason)


def check_text(value, field: str, *, file=None, row=None, allow_empty: bool = False) -> str:
  """Checks that ``value`` is a decodable string (non-empty unless ``allow_empty``); returns it.

  Undecodable bytes read with ``errors="surrogateescape"`` show up as lone surrogates, as do
  JSON ``\\ud800`` escapes: both fail here with reason ``undecodable_text``.
  """
  if value is None:
    raise _err("missing (null)", field, "missing_field", file, row)
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _err(f"bytes that are not UTF-8 ({e.reason} at byte {e.start})", field,
                 "undecodable_text", file, row) from None
  if not isinstance(value, str):
    raise _err(f"expected text, got {type(value).__name__}", field, "wrong_type", file, row)
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    bad = value[e.start]
    raise _err(f"undecodable text: {ascii(bad)} at character {e.start} (not UTF-8 / lone "
               "surrogate)", field, "undecodable_text", file, row) from None
  if not allow_empty and not value.strip():
    raise _err("empty text", field, "empty_field", file, row)
  return value


def check_number(value, field: str, *, file=None, row=None) -> float:
  """A finite real number (bools and strings are wrong types)."""
  if value is None:
    raise _err("missing (null)", field, "missing_field", file, row)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _err(f"expected a number, got {type(value).__name__} {value!r:.40}", field,
               "wrong_type", file, row)
  value = float(value)
  if not math.isfinite(value):
    raise _err(f"score is {value}", field, "non_finite_score", file, row)
  return value


def _check_list(value, field, file, row) -> list:
  if value is None:
    raise _err("missing (null)", field, "missing_field", file, row)
  if not isinstance(value, (list, tuple)):
    raise _err(f"expected a list, got {type(value).__name__}", field, "wrong_type", file, row)
  return list(value)


def check_prompt(prompt, *, field: str = "prompt", file=None, row=None) -> None:
  """A non-empty list of ``{role, content}`` turns with known roles, ending with a user turn."""
  prompt = _check_list(prompt, field, file, row)
  if not prompt:
    raise _err("empty prompt (no turns)", field, "empty_field", file, row)
  for i, turn in enumerate(prompt):
    where = f"{field}[{i}]"
    if not isinstance(turn, dict):
      raise _err(f"expected a {{role, content}} dict, got {type(turn).__name__}", where,
                 "wrong_type", file, row)
    for key in ("role", "content"):
      if key not in turn or turn[key] is None:
        raise _err("missing", f"{where}.{key}", "missing_field", file, row)
    role = turn["role"]
    if not isinstance(role, str):
      raise _err(f"expected text, got {type(role).__name__}", f"{where}.role", "wrong_type",
                 file, row)
    if role not in ROLES:
      raise _err(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", f"{where}.role",
                 "unknown_role", file, row)
    check_text(turn["content"], f"{where}.content", file=file, row=row)
  if prompt[-1]["role"] != "user":
    raise _err(f"the prompt ends with a {prompt[-1]['role']!r} turn, not a 'user' turn",
               f"{field}[{len(prompt) - 1}].role", "prompt_not_ending_with_user", file, row)


def _check_matrix(value, field, n, k, file, row) -> list[list[float]]:
  value = _check_list(value, field, file, row)
  if len(value) != n:
    raise _err(f"{len(value)} rows for {n} responses", field, "wrong_shape", file, row)
  out = []
  for i, line in enumerate(value):
    line = _check_list(line, f"{field}[{i}]", file, row)
    if len(line) != k:
      raise _err(f"{len(line)} values for {k} objectives", f"{field}[{i}]",
                 "wrong_num_objectives", file, row)
    out.append([check_number(x, f"{field}[{i}][{j}]", file=file, row=row)
                for j, x in enumerate(line)])
  return out


def check_length(example: dict, *, count_tokens: CountTokens, max_tokens: int, file=None,
                 row=None) -> None:
  """Raises ``DataError`` (reason ``too_long``) if a (prompt, response) of the row is too long.

  ``count_tokens(prompt_turns, response)`` is the tokenized length of the rendered prompt plus
  response (the pipeline's own rendering); the check runs over chosen, rejected (when the row
  has a pair) and every scored response.
  """
  texts = []
  if example["chosen"] or example["rejected"]:
    texts += [("chosen", example["chosen"]), ("rejected", example["rejected"])]
  texts += [(f"responses[{i}]", r) for i, r in enumerate(example["responses"])]
  for field, text in texts:
    n = int(count_tokens(example["prompt"], text))
    if n > max_tokens:
      raise _err(f"{n} tokens after tokenization (prompt + response) > max_tokens={max_tokens}",
                 field, "too_long", file, row)


def validate_example(example, *, file=None, row=None, max_tokens: int | None = None,
                     count_tokens: CountTokens | None = None) -> None:
  """Checks one schema dict; raises ``DataError`` naming file, row, field and a reason code.

  Checks: every field present with the right type; non-empty id / source / objectives / prompt
  turns; roles known and the prompt ending with a user turn; text decodable; chosen / rejected
  both set (a pair) or both empty, and different; pair_objectives of length K with values in
  {-1, 0, 1} (the pair's label per objective: 1 = chosen preferred on k, -1 = rejected preferred
  on k, 0 = no label; at least one label for a pair, all 0 without); responses non-empty; scores and score_mask of
  shape [N, K], finite, mask 0/1 and masked-out scores 0; a pair or at least one response; and,
  with ``count_tokens`` and ``max_tokens``, the tokenized length (``check_length``).
  """
  if not isinstance(example, dict):
    raise _err(f"expected a dict, got {type(example).__name__}", None, "wrong_type", file, row)
  for name in FIELDS:
    if name not in example or example[name] is None:
      raise _err("missing", name, "missing_field", file, row)
  check_text(example["id"], "id", file=file, row=row)
  check_text(example["source"], "source", file=file, row=row)
  objectives = _check_list(example["objectives"], "objectives", file, row)
  if not objectives:
    raise _err("no objectives", "objectives", "empty_field", file, row)
  for i, name in enumerate(objectives):
    check_text(name, f"objectives[{i}]", file=file, row=row)
  if len(set(objectives)) != len(objectives):
    raise _err(f"duplicate objective names {objectives}", "objectives", "wrong_num_objectives",
               file, row)
  k = len(objectives)
  check_prompt(example["prompt"], file=file, row=row)

  chosen = check_text(example["chosen"], "chosen", file=file, row=row, allow_empty=True)
  rejected = check_text(example["rejected"], "rejected", file=file, row=row, allow_empty=True)
  has_pair = bool(chosen.strip()) or bool(rejected.strip())
  if has_pair:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
      if not text.strip():
        raise _err("empty response (the other side of the pair is set)", name, "empty_field",
                   file, row)
    if chosen == rejected:
      raise _err("chosen and rejected are identical", "rejected", "chosen_equals_rejected",
                 file, row)

  pair_objectives = _check_list(example["pair_objectives"], "pair_objectives", file, row)
  if len(pair_objectives) != k:
    raise _err(f"{len(pair_objectives)} values for {k} objectives {objectives}",
               "pair_objectives", "wrong_num_objectives", file, row)
  pair_objectives = [check_number(x, f"pair_objectives[{i}]", file=file, row=row)
                     for i, x in enumerate(pair_objectives)]
  if any(x not in (-1.0, 0.0, 1.0) for x in pair_objectives):
    raise _err(f"values must be -1, 0 or 1, got {pair_objectives}", "pair_objectives",
               "bad_pair_objectives", file, row)
  if has_pair and not any(pair_objectives):
    raise _err("the pair speaks for no objective (all 0)", "pair_objectives",
               "bad_pair_objectives", file, row)
  if not has_pair and any(pair_objectives):
    raise _err("set, but the row has no (chosen, rejected) pair", "pair_objectives",
               "bad_pair_objectives", file, row)

  responses = _check_list(example["responses"], "responses", file, row)
  for i, text in enumerate(responses):
    check_text(text, f"responses[{i}]", file=file, row=row)
  n = len(responses)
  scores = _check_matrix(example["scores"], "scores", n, k, file, row)
  mask = _check_matrix(example["score_mask"], "score_mask", n, k, file, row)
  for i in range(n):
    for j in range(k):
      if mask[i][j] not in (0.0, 1.0):
        raise _err(f"value {mask[i][j]} is not 0 or 1", f"score_mask[{i}][{j}]",
                   "bad_score_mask", file, row)
      if mask[i][j] == 0.0 and scores[i][j] != 0.0:
        raise _err(f"score {scores[i][j]} where score_mask is 0 (must be 0)",
                   f"scores[{i}][{j}]", "bad_score_mask", file, row)
  if not has_pair and not n:
    raise _err("no (chosen, rejected) pair and no scored responses", "chosen",
               "no_preference_data", file, row)
  if (max_tokens is None) != (count_tokens is None):
    raise ValueError("the length check needs both max_tokens and count_tokens")
  if count_tokens is not None:
    check_length(example, count_tokens=count_tokens, max_tokens=max_tokens, file=file, row=row)


@dataclasses.dataclass
class ValidationReport:
  """What a lenient (or strict) read kept and dropped.

  ``counts``: dropped rows by reason code; ``rows_read`` / ``rows_kept``: input rows (file
  lines) seen / kept; ``examples``: schema examples produced (fewer than rows when a builder
  groups several rows into one example); ``first``: the first error message per reason.
  """
  mode: str = "strict"
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  rows_read: int = 0
  rows_kept: int = 0
  examples: int = 0
  first: dict = dataclasses.field(default_factory=dict)
  dropped_rows: list = dataclasses.field(default_factory=list)  # (file, row, reason)

  @property
  def dropped(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    head = (f"{self.rows_read} rows read, {self.rows_kept} kept, {self.dropped} dropped, "
            f"{self.examples} examples ({self.mode} mode)")
    lines = [head]
    for reason, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
      lines.append(f"  {reason}: {count}  (first: {self.first[reason]})")
    return "\n".join(lines)

  def to_dict(self) -> dict:
    return {"mode": self.mode, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
            "examples": self.examples, "dropped": dict(sorted(self.counts.items()))}

  def merge(self, other: "ValidationReport") -> None:
    self.counts.update(other.counts)
    self.rows_read += other.rows_read
    self.rows_kept += other.rows_kept
    self.examples += other.examples
    for reason, msg in other.first.items():
      self.first.setdefault(reason, msg)
    self.dropped_rows += other.dropped_rows


class RowPolicy:
  """Applies the validation policy while a builder reads rows.

  ``check(example, file, row)`` validates (with the optional length hook); ``reject(err)`` either
  re-raises (strict) or records the drop (lenient; a (file, row) is counted once even when a
  builder revisits it); ``kept(n_rows)`` / ``emitted()`` keep the counts.
  """

  def __init__(self, mode: str = "strict", *, max_tokens: int | None = None,
               count_tokens: CountTokens | None = None):
    if mode not in ("strict", "lenient"):
      raise ValueError(f"mode must be 'strict' or 'lenient', got {mode!r}")
    if (max_tokens is None) != (count_tokens is None):
      raise ValueError("the length check needs both max_tokens and count_tokens")
    self.mode = mode
    self.max_tokens, self.count_tokens = max_tokens, count_tokens
    self.report = ValidationReport(mode=mode)
    self._seen_bad: set = set()

  @property
  def strict(self) -> bool:
    return self.mode == "strict"

  def check(self, example: dict, *, file=None, row=None) -> None:
    validate_example(example, file=file, row=row, max_tokens=self.max_tokens,
                     count_tokens=self.count_tokens)

  def read(self, n: int = 1) -> None:
    self.report.rows_read += n

  def kept(self, n: int = 1) -> None:
    self.report.rows_kept += n

  def emitted(self, n: int = 1) -> None:
    self.report.examples += n

  def reject(self, err: DataError, *, n_rows: int = 1) -> None:
    if self.strict:
      raise err
    key = (err.file, err.row)
    if key in self._seen_bad and err.row is not None:
      return
    self._seen_bad.add(key)
    reason = err.reason or "malformed_file"
    self.report.counts[reason] += n_rows
    self.report.first.setdefault(reason, str(err))
    self.report.dropped_rows.append((err.file, err.row, reason))

  def log_summary(self, what: str = "") -> None:
    prefix = f"{what}: " if what else ""
    if self.report.dropped:
      log.warning("%s%s", prefix, self.report.summary())
    else:
      log.info("%s%s", prefix, self.report.summary())
