"""Errors for bad input data: every message names the file, the row and the field."""

from __future__ import annotations


class DataError(ValueError):
  """A problem with one row of an input file.

  str(err) reads like ``data/train.jsonl: row 17: field 'chosen': empty string``.
  Rows are numbered from 1 (for JSONL files: the line number). ``reason`` is a short
  stable code (see ``pro_jax.data.validate.REASONS``) that lenient mode counts by.
  """

  def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
               field: str | None = None, reason: str | None = None):
    self.message, self.file, self.row, self.field = message, file, row, field
    self.reason = reason
    where = []
    if file is not None:
      where.append(str(file))
    if row is not None:
      where.append(f"row {row}")
    if field is not None:
      where.append(f"field {field!r}")
    super().__init__(": ".join(where + [message]))

  def located(self, *, file: str | None = None, row: int | None = None,
              field_prefix: str | None = None) -> "DataError":
    """A copy with the file / row filled in where missing, and the field prefixed."""
    field = self.field
    if field_prefix:
      field = field_prefix if field is None else f"{field_prefix}.{field}"
    return DataError(self.message, file=self.file if self.file is not None else file,
                     row=self.row if self.row is not None else row, field=field,
                     reason=self.reason)
