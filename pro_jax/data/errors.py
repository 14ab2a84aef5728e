"""Errors for bad input data: every message names the file, the row and the field."""

from __future__ import annotations


class DataError(ValueError):
  """A problem with one row of an input file.

  str(err) reads like ``data/train.jsonl: row 17: field 'chosen': empty string``.
  """

  def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
               field: str | None = None):
    self.message, self.file, self.row, self.field = message, file, row, field
    where = []
    if file is not None:
      where.append(str(file))
    if row is not None:
      where.append(f"row {row}")
    if field is not None:
      where.append(f"field {field!r}")
    super().__init__(": ".join(where + [message]))
