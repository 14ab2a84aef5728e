"""Reading and preparing the preference datasets: a small API over the tfds builders.

- ``load_examples(name, split, manual_dir=...)`` parses the raw files directly (no tfds write) and
  returns a list of schema dicts; with only ``data_dir`` it reads prepared array_record data.
- ``build(name, data_dir=..., manual_dir=...)`` validates every row first (strict mode raises
  before anything is written), then prepares array_record files with tfds (written into a
  temporary ``incomplete.*`` directory and renamed when complete; existing prepared data is
  reused, never overwritten).
- ``data_source(name, split, data_dir=...)`` is ``tfds.data_source`` over prepared data; it returns
  plain schema dicts (``decode=False``: tfds' own records).

``name`` is a builder name (``"hh_rlhf"``, ``"ultrafeedback"``, ``"helpsteer2"``,
``"summarize_from_feedback"``, ``"generic_preferences"``), optionally with its config
(``"hh_rlhf/harmless-base"``), or a builder class / instance. ``config`` is a config name or a
``BuilderConfig`` (``GenericConfig`` for users' data).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any, Sequence

import tensorflow_datasets as tfds

from pro_jax.data import schema
from pro_jax.data.builders.common import Files, PreferenceBuilder, split_files
from pro_jax.data.builders.generic import GenericConfig, GenericPreferences
from pro_jax.data.builders.helpsteer2 import Helpsteer2
from pro_jax.data.builders.hh_rlhf import HhRlhf
from pro_jax.data.builders.summarize_from_feedback import SummarizeFromFeedback
from pro_jax.data.builders.ultrafeedback import Ultrafeedback
from pro_jax.data.errors import DataError
from pro_jax.data.validate import CountTokens, RowPolicy, ValidationReport

log = logging.getLogger("pro_jax.data")

BUILDERS: dict[str, type[PreferenceBuilder]] = {
    cls.name: cls for cls in (HhRlhf, Ultrafeedback, Helpsteer2, SummarizeFromFeedback,
                              GenericPreferences)
}


def _expand(path):
  """``~`` expanded for local paths (left alone for ``gs://`` and other URLs, and None)."""
  if path is None or "://" in os.fspath(path):
    return path
  return os.path.expanduser(os.fspath(path))


class ExampleList(list):
  """A list of schema dicts with the ``ValidationReport`` of the read (``.report``)."""
  report: ValidationReport | None = None


def resolve(name_or_builder: Any, config: Any = None) -> tuple[type[PreferenceBuilder], Any]:
  """(builder class, BuilderConfig) from a name like ``"hh_rlhf/harmless-base"`` or a builder."""
  if isinstance(name_or_builder, PreferenceBuilder):
    return type(name_or_builder), config if config is not None else name_or_builder.builder_config
  if isinstance(name_or_builder, type) and issubclass(name_or_builder, PreferenceBuilder):
    cls = name_or_builder
  elif isinstance(name_or_builder, str):
    name, _, config_name = name_or_builder.partition("/")
    if name not in BUILDERS:
      raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(BUILDERS))}")
    cls = BUILDERS[name]
    if config_name:
      if config is not None and getattr(config, "name", config) != config_name:
        raise ValueError(f"config given twice: {name_or_builder!r} and {config!r}")
      config = config if config is not None else config_name
  else:
    raise TypeError(f"expected a dataset name or a preference builder, got {name_or_builder!r}")
  if isinstance(config, tfds.core.BuilderConfig):
    return cls, config
  if cls is GenericPreferences:
    raise ValueError(f"generic_preferences needs config=GenericConfig(...), got {config!r}")
  configs = dict(cls.builder_configs)
  if config is None:
    if len(configs) != 1:
      raise ValueError(f"{cls.name} needs a config: one of {', '.join(configs)}")
    config = next(iter(configs))
  if config not in configs:
    raise ValueError(f"{cls.name} has no config {config!r}; configs: {', '.join(configs)}")
  return cls, configs[config]


def _names(name_or_builder: Any, config: Any = None) -> tuple[str, str]:
  """(builder name, config name); for reading prepared data a generic config may be a name."""
  if isinstance(name_or_builder, str) and name_or_builder.partition("/")[0] == GenericPreferences.name:
    config_name = name_or_builder.partition("/")[2] or getattr(config, "name", config)
    if not config_name:
      raise ValueError("generic_preferences needs a config (a GenericConfig or its name)")
    return GenericPreferences.name, config_name
  cls, cfg = resolve(name_or_builder, config)
  return cls.name, cfg.name


def _raw(cls, config, split: str, *, manual_dir, files: Files | None, policy: RowPolicy):
  paths = split_files(manual_dir, files or config.files, [split])[split]
  return cls.read_split(paths, split, config, policy)


def load_examples(name_or_builder: Any, split: str, *, data_dir: str | None = None,
                  manual_dir: str | None = None, config: Any = None, mode: str = "strict",
                  files: Files | None = None, max_tokens: int | None = None,
                  count_tokens: CountTokens | None = None) -> ExampleList:
  """All examples of one split as schema dicts (``.report`` holds the validation counts).

  With ``manual_dir``: parses the raw files (``files`` overrides the config's split -> globs).
  Without: reads prepared data from ``data_dir`` (built by ``build``); ``max_tokens`` /
  ``count_tokens`` then re-check every example (strict: raise, lenient: drop; errors then name
  the position in the prepared split as the row, and the example's id names the raw row).
  """
  manual_dir, data_dir = _expand(manual_dir), _expand(data_dir)
  policy = RowPolicy(mode, max_tokens=max_tokens, count_tokens=count_tokens)
  if manual_dir is not None:
    cls, cfg = resolve(name_or_builder, config)
    name = f"{cls.name}/{cfg.name}"
    out = ExampleList(_raw(cls, cfg, split, manual_dir=manual_dir, files=files, policy=policy))
  elif data_dir is not None:
    name = "/".join(_names(name_or_builder, config))
    source = data_source(name, split, data_dir=data_dir)
    out = ExampleList()
    where = os.path.join(str(data_dir), name)
    for i in range(len(source)):
      example = source[i]
      policy.read()
      try:
        policy.check(example, file=where, row=i + 1)
      except DataError as err:
        policy.reject(err)
        continue
      policy.kept()
      policy.emitted()
      out.append(example)
  else:
    raise ValueError("load_examples needs manual_dir (raw files) or data_dir (prepared data)")
  out.report = policy.report
  policy.log_summary(f"{name} {split}")
  return out


@dataclasses.dataclass
class BuildResult:
  """What ``build`` did: where the data is, examples per split, the validation report."""
  data_path: str
  splits: dict[str, int]
  report: ValidationReport
  reused: bool  # True: prepared data already existed and was left as it was


def build(name_or_builder: Any, *, data_dir: str, manual_dir: str, config: Any = None,
          mode: str = "strict", files: Files | None = None, splits: Sequence[str] | None = None,
          max_tokens: int | None = None, count_tokens: CountTokens | None = None) -> BuildResult:
  """Validates every row of the raw files, then prepares array_record files under ``data_dir``.

  Strict mode raises ``DataError`` (file, row, field) during the validation pass, before tfds
  writes anything. tfds writes into ``<data_dir>/<name>/<config>/incomplete.*`` and renames it
  to ``<version>`` only when complete, so a failing run leaves no partial data. Data already
  prepared at that path is reused, never overwritten (delete the version directory to rebuild).
  ``data_dir`` may be a GCS path (``gs://...``) where tfds / etils can write to it.
  """
  manual_dir, data_dir = _expand(manual_dir), _expand(data_dir)
  cls, cfg = resolve(name_or_builder, config)
  paths = split_files(manual_dir, files or cfg.files, splits)
  report = ValidationReport(mode=mode)
  for split, split_paths in paths.items():  # the validation pass: nothing is written yet
    policy = RowPolicy(mode, max_tokens=max_tokens, count_tokens=count_tokens)
    for _ in cls.read_split(split_paths, split, cfg, policy):
      pass
    policy.log_summary(f"{cls.name}/{cfg.name} {split} (validation pass)")
    report.merge(policy.report)
  builder = cls(config=cfg, data_dir=data_dir, mode=mode, files=files, splits=list(paths),
                max_tokens=max_tokens, count_tokens=count_tokens)
  data_path = os.fspath(builder.data_dir)
  if builder.is_prepared():
    log.warning("%s is already prepared; reusing it (delete it to rebuild)", data_path)
    reused = True
  else:
    config_dir = os.path.dirname(data_path)
    existed = os.path.isdir(config_dir) if "://" not in config_dir else True
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except BaseException:
      if not existed and os.path.isdir(config_dir) and not os.listdir(config_dir):
        shutil.rmtree(config_dir, ignore_errors=True)  # the empty dir tfds made for this config
      raise
    reused = False
  split_sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
  return BuildResult(data_path=data_path, splits=split_sizes, report=report, reused=reused)


build_dataset = build  # the name exported at the package top level (``pro_jax.build_dataset``)


class ExampleSource:
  """Random access over prepared data, returning plain schema dicts (``len``, ``[i]``)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    return schema.from_tfds(self.source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"ExampleSource({self.source!r})"


def data_source(name_or_builder: Any, split: str, *, data_dir: str, config: Any = None,
                decode: bool = True):
  """``tfds.data_source`` over prepared data (never downloads or builds).

  ``decode=True``: an ``ExampleSource`` returning schema dicts; ``False``: tfds' source itself
  (dicts of bytes / numpy arrays, as ``schema.features()`` decodes them).
  """
  name, config_name = _names(name_or_builder, config)
  source = tfds.data_source(f"{name}/{config_name}", split=split, data_dir=_expand(data_dir),
                            download=False)
  return ExampleSource(source) if decode else source


__all__ = ["BUILDERS", "BuildResult", "ExampleList", "ExampleSource", "GenericConfig", "build",
           "build_dataset", "data_source", "load_examples", "resolve"]
