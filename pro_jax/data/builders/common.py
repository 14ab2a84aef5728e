"""What every builder shares: finding files, reading JSONL / parquet rows, the row loop, the base
tfds builder.

A builder module has a pure-Python reader, ``read_split(files, split, config, policy)`` yielding
schema dicts (validated by ``policy``), and a tfds ``GeneratorBasedBuilder`` around it. The reader
works without tfds writing anything, which is what ``pro_jax.data.sources.load_examples`` uses.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import inspect
import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from pro_jax.data import schema
from pro_jax.data.errors import DataError
from pro_jax.data.validate import RowPolicy, check_number, check_text

log = logging.getLogger("pro_jax.data")

Files = dict[str, Sequence[str]]  # split -> file paths or glob patterns (relative to manual_dir)


# ---------------------------------------------------------------------------------------------
# files


def resolve_files(manual_dir: str | os.PathLike | None, patterns: Sequence[str]) -> list[str]:
  """Expands glob patterns (relative to ``manual_dir`` unless absolute) into sorted file paths."""
  out: list[str] = []
  for pattern in patterns:
    pattern = os.fspath(pattern)
    if not os.path.isabs(pattern) and "://" not in pattern:
      if manual_dir is None:
        raise ValueError(f"relative file pattern {pattern!r} needs manual_dir")
      pattern = os.path.join(os.fspath(manual_dir), pattern)
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else (
        [pattern] if os.path.exists(pattern) else [])
    out.extend(m for m in matches if m not in out)
  return out


def split_files(manual_dir, files: Files, splits: Sequence[str] | None = None) -> dict[str, list[str]]:
  """Split -> existing files. Splits with no file are left out unless asked for in ``splits``."""
  wanted = list(splits) if splits is not None else list(files)
  out = {}
  for split in wanted:
    if split not in files:
      raise ValueError(f"unknown split {split!r}; this config has splits {sorted(files)}")
    paths = resolve_files(manual_dir, files[split])
    if paths:
      out[split] = paths
    elif splits is not None:
      raise FileNotFoundError(
          f"split {split!r}: no file matches {list(files[split])} under manual_dir={manual_dir}")
    else:
      log.info("split %r: no file matches %s under %s (skipped)", split, list(files[split]),
               manual_dir)
  if not out:
    expected = {s: list(p) for s, p in files.items()}
    raise FileNotFoundError(f"no input files found under manual_dir={manual_dir}; expected {expected}")
  return out


# ---------------------------------------------------------------------------------------------
# rows


def _open_binary(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """Yields (row, dict) per non-blank line, row = line number (from 1).

  A line that is not a JSON object is yielded as a ``DataError`` (reason ``malformed_json``) for
  the policy to raise or count. Bytes that are not UTF-8 are kept as lone surrogates
  (``surrogateescape``) so that the field holding them is named by the text check.
  """
  try:
    with _open_binary(path) as f:
      for row, raw in enumerate(f, start=1):
        line = raw.decode("utf-8", errors="surrogateescape").strip()
        if not line:
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          yield row, DataError(f"not valid JSON ({e.msg} at column {e.colno})", file=path,
                               row=row, reason="malformed_json")
          continue
        if not isinstance(obj, dict):
          yield row, DataError(f"expected a JSON object, got {type(obj).__name__}", file=path,
                               row=row, reason="malformed_json")
          continue
        yield row, obj
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"cannot read the file: {e}", file=path, reason="malformed_file") from e


def iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
  """Yields (row, dict) per parquet row (row numbered from 1). Needs ``pyarrow``."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - pyarrow comes with tensorflow-datasets
    raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
  try:
    pfile = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for broken files
    raise DataError(f"cannot read the parquet file: {e}", file=path, reason="malformed_file") from e
  row = 0
  for batch in pfile.iter_batches(batch_size=1024):
    for obj in batch.to_pylist():
      row += 1
      yield row, obj


def iter_records(path: str) -> Iterator[tuple[int, Any]]:
  """JSONL (``.jsonl``, ``.json`` lines, optionally ``.gz``) or parquet (``.parquet``)."""
  if path.endswith(".parquet"):
    return iter_parquet(path)
  return iter_jsonl(path)


# ---------------------------------------------------------------------------------------------
# field access on raw rows (errors name the raw field, as the user sees it in the file)


def get(obj: Any, path: str, *, file: str, row: int, required: bool = True) -> Any:
  """``obj["a"]["b"]`` for ``path="a.b"``; missing or null -> ``missing_field`` (or None)."""
  value = obj
  for part in path.split("."):
    if isinstance(value, dict) and part in value and value[part] is not None:
      value = value[part]
    elif isinstance(value, dict) or value is None:
      if required:
        raise DataError("missing (absent or null)", file=file, row=row, field=path,
                        reason="missing_field")
      return None
    else:
      raise DataError(f"expected an object holding {part!r}, got {type(value).__name__}",
                      file=file, row=row, field=path, reason="wrong_type")
  return value


def text(obj: Any, path: str, *, file: str, row: int, allow_empty: bool = False,
         strip: bool = True) -> str:
  """A required text field, checked (type, UTF-8, non-empty) and stripped."""
  value = check_text(get(obj, path, file=file, row=row), path, file=file, row=row,
                     allow_empty=allow_empty)
  return value.strip() if strip else value


def number(value: Any, field: str, *, file: str, row: int, na: Iterable[Any] = ()) -> float | None:
  """A finite number; numeric strings ("4", "4.5") are accepted; values in ``na`` give None."""
  if value is None:
    raise DataError("missing (null)", file=file, row=row, field=field, reason="missing_field")
  na = tuple(na)
  if isinstance(value, str):
    stripped = value.strip()
    if stripped in na:
      return None
    try:
      value = float(stripped)
    except ValueError:
      raise DataError(f"expected a number, got {value!r:.40}", file=file, row=row, field=field,
                      reason="wrong_type") from None
  elif not isinstance(value, bool) and value in na:
    return None
  return check_number(value, field, file=file, row=row)


def common_prefix_len(a: str, b: str) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


# ---------------------------------------------------------------------------------------------
# the row loop


def _kept_records(paths: Sequence[str], policy: RowPolicy,
                  keep_row: Callable[..., bool] | None) -> Iterator[tuple[str, int, Any]]:
  """(path, row, obj) for every record of ``paths`` that ``keep_row`` keeps (all without it), each
  counted as read; a DataError raised by ``keep_row`` rejects its row. ``obj`` may be a DataError
  (an unreadable record), for the caller to reject."""
  for path in paths:
    n_records = 0
    for row, obj in iter_records(path):
      n_records += 1
      if keep_row is not None and not isinstance(obj, DataError):
        try:
          if not keep_row(obj, file=path, row=row):
            continue
        except DataError as err:
          policy.read()
          policy.reject(err)
          continue
      policy.read()
      yield path, row, obj
    if n_records == 0:
      empty_file(path, policy)


def empty_file(path: str, policy: RowPolicy) -> None:
  """A file without a single row: an error in strict mode (usually a failed export or a wrong
  path), a warning in lenient mode."""
  if policy.strict:
    raise DataError("the file holds no rows (strict mode; pass mode='lenient' to accept an empty file)",
                    file=path, reason="empty_file")
  log.warning("%s: the file holds no rows", path)


def convert_rows(paths: Sequence[str], parse_row: Callable[..., dict | None], policy: RowPolicy,
                 *, keep_row: Callable[[Any], bool] | None = None,
                 user_field: Callable[[str | None, Any], str | None] | None = None) -> Iterator[dict]:
  """Reads every row of ``paths``, converts it with ``parse_row(obj, file=, row=)`` into a schema
  dict, validates it, and yields it; bad rows go to ``policy`` (raise or drop and count).

  ``keep_row(obj)`` (optional) skips rows silently (e.g. rows of another split). ``parse_row``
  may return None to skip a row silently too. Ids must be unique within the split.
  ``user_field(schema_field, obj)`` (optional) renames the schema field a validation error names
  (e.g. ``prompt[1].role``) to the raw row's own column (e.g. ``q[1].role``).
  """
  seen_ids: set[str] = set()
  for path, row, obj in _kept_records(paths, policy, keep_row):
    try:
      if isinstance(obj, DataError):
        raise obj
      example = parse_row(obj, file=path, row=row)
      if example is None:
        continue
      try:
        policy.check(example, file=path, row=row)
      except DataError as err:
        if user_field is None:
          raise
        raise DataError(err.message, file=err.file, row=err.row, field=user_field(err.field, obj),
                        reason=err.reason) from None
      if example["id"] in seen_ids:
        raise DataError(f"id {example['id']!r} already used in this split", file=path, row=row,
                        field=user_field("id", obj) if user_field else "id", reason="duplicate_id")
    except DataError as err:
      policy.reject(err.located(file=path, row=row))
      continue
    seen_ids.add(example["id"])
    policy.kept()
    policy.emitted()
    yield example


@dataclasses.dataclass
class Scored:
  """One response of a grouped builder (HelpSteer2, axis evals) before grouping."""
  key: str  # group key (the prompt)
  prompt: list[dict]
  response: str
  scores: list[float]
  mask: list[float]
  file: str
  row: int


def group_scored(paths: Sequence[str], parse_row: Callable[..., Scored | None], policy: RowPolicy,
                 *, source: str, objectives: Sequence[str],
                 make_pair: Callable[[list[Scored]], tuple[int, int, list[float]] | None] | None = None,
                 keep_row: Callable[..., bool] | None = None,
                 user_field: Callable[[str | None, Any], str | None] | None = None) -> Iterator[dict]:
  """Rows with one scored response each, grouped by prompt into examples with responses [N].

  Each row is validated on its own first (as a one-response example), so a bad row is dropped
  alone; groups keep the order of their first row. ``make_pair(group)`` may return
  ``(i_chosen, i_rejected, pair_objectives)`` to also set a pair. Example id = the first row's
  ``<file name>:<row>``. ``user_field``: as in ``convert_rows`` (for the one-row check).
  """
  groups: dict[str, list[Scored]] = {}
  k = len(objectives)
  for path, row, obj in _kept_records(paths, policy, keep_row):
    try:
      if isinstance(obj, DataError):
        raise obj
      item = parse_row(obj, file=path, row=row)
      if item is None:
        continue
      if len(item.scores) != k:
        raise DataError(f"{len(item.scores)} scores for {k} objectives", field="scores",
                        reason="wrong_num_objectives")
      single = schema.make_example(
          id=f"{os.path.basename(path)}:{row}", source=source, objectives=objectives,
          prompt=item.prompt, responses=[item.response], scores=[item.scores],
          score_mask=[item.mask])
      try:
        policy.check(single, file=path, row=row)
      except DataError as err:
        if user_field is None:
          raise
        raise DataError(err.message, file=err.file, row=err.row, field=user_field(err.field, obj),
                        reason=err.reason) from None
    except DataError as err:
      policy.reject(err.located(file=path, row=row))
      continue
    policy.kept()
    groups.setdefault(item.key, []).append(item)
  for items in groups.values():
    first = items[0]
    chosen = rejected = ""
    pair_objectives = None
    if make_pair is not None:
      pair = make_pair(items)
      if pair is not None:
        i, j, pair_objectives = pair
        chosen, rejected = items[i].response, items[j].response
    example = schema.make_example(
        id=f"{os.path.basename(first.file)}:{first.row}", source=source, objectives=objectives,
        prompt=first.prompt, chosen=chosen, rejected=rejected, pair_objectives=pair_objectives,
        responses=[it.response for it in items], scores=[it.scores for it in items],
        score_mask=[it.mask for it in items])
    try:
      policy.check(example, file=first.file, row=first.row)
    except DataError as err:
      policy.reject(err, n_rows=len(items))
      continue
    policy.emitted()
    yield example


def pair_by(index: int) -> Callable[[list[Scored]], tuple[int, int, list[float]] | None]:
  """A ``make_pair`` for ``group_scored``: chosen = the highest score on objective ``index``
  (first on ties), rejected = the lowest (first on ties), if lower; the pair speaks for that
  objective only. No pair when fewer than two responses are rated on it or their texts match."""
  def make_pair(items: list[Scored]) -> tuple[int, int, list[float]] | None:
    rated = [i for i, it in enumerate(items) if it.mask[index]]
    if len(rated) < 2:
      return None
    best = max(rated, key=lambda i: (items[i].scores[index], -i))
    worst = min(rated, key=lambda i: (items[i].scores[index], i))
    if items[best].scores[index] <= items[worst].scores[index]:
      return None
    if items[best].response == items[worst].response:
      return None
    pair_objectives = [0.0] * len(items[best].scores)
    pair_objectives[index] = 1.0
    return best, worst, pair_objectives
  return make_pair


# ---------------------------------------------------------------------------------------------
# tfds


class PreferenceConfig(tfds.core.BuilderConfig):
  """A builder config with the default input files per split (globs relative to manual_dir)."""

  def __init__(self, *, files: Files, **kwargs):
    super().__init__(**kwargs)
    self.files = {split: tuple(p) for split, p in files.items()}


class PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the preference builders: array_record files, the schema's FeaturesDict, validation.

  Extra constructor arguments (not part of the prepared data's identity):
    mode: "strict" (default; the first bad row raises DataError) or "lenient" (drop and count).
    files: split -> file paths / globs overriding the config's defaults (relative to manual_dir).
    splits: the splits to prepare (default: every split whose files exist).
    max_tokens, count_tokens: the optional over-long check (see pro_jax.data.validate).
  The counts of dropped rows per split are stored in ``info.metadata["validation"]``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  HOMEPAGE = ""
  CITATION = ""
  DESCRIPTION = ""

  def __init__(self, *, mode: str = "strict", files: Files | None = None,
               splits: Sequence[str] | None = None, max_tokens: int | None = None,
               count_tokens=None, **kwargs):
    self._policy_args = dict(mode=mode, max_tokens=max_tokens, count_tokens=count_tokens)
    RowPolicy(**self._policy_args)  # checks the arguments now
    self._files_override = files
    self._splits = splits
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default resolves the module through importlib_resources, which tfds 4.9.10 imports
    # but does not install (ModuleNotFoundError for a builder defined inside a package).
    return epath.Path(inspect.getfile(cls))

  # subclasses implement: read_split(paths, split, config, policy) -> Iterator[dict]
  read_split: Callable[..., Iterator[dict]]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=schema.features(), homepage=self.HOMEPAGE or None,
                                 citation=self.CITATION, metadata=tfds.core.MetadataDict(),
                                 # keep file order: example i of a split = the i-th kept example
                                 disable_shuffling=True)

  def input_files(self, manual_dir) -> dict[str, list[str]]:
    files = self._files_override or self.builder_config.files
    return split_files(manual_dir, files, self._splits)

  def _split_generators(self, dl_manager):
    paths = self.input_files(dl_manager.manual_dir)
    return {split: self._generate_examples(split=split, paths=p) for split, p in paths.items()}

  def _generate_examples(self, split: str, paths: list[str]):
    policy = RowPolicy(**self._policy_args)
    for example in type(self).read_split(paths, split, self.builder_config, policy):
      yield example["id"], schema.to_tfds(example)
    policy.log_summary(f"{self.name}/{self.builder_config.name} {split}")
    validation = dict(self.info.metadata.get("validation", {}))
    validation[split] = policy.report.to_dict()
    self.info.metadata["validation"] = validation

