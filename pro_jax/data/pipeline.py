"""The input pipeline: schema examples -> tokenized, bucket-padded numpy batches, via grain.

    pipe = Pipeline(examples_or_tfds_source, tokenizer, PipelineConfig(kind="pair", batch_size=64),
                    name="train.jsonl")
    it = pipe.iterator()                  # this host's rows of every global batch
    batch = next(it)                      # dict of numpy arrays, static bucket shapes
    state = it.get_state()                # JSON-able; the engine checkpoints it
    it = pipe.iterator(state)             # resumes with exactly the batches that would come next

Batch kinds (docs/ARCHITECTURE.md "Batches"; tokens / masks int32, numeric fields float32):

* "pair": ``chosen_tokens``, ``chosen_mask``, ``chosen_loss_mask``, ``rejected_tokens``,
  ``rejected_mask``, ``rejected_loss_mask`` [B, L] (right-padded, chosen and rejected share L),
  ``prompt_tokens``, ``prompt_mask`` [B, Lp] (left-padded), ``pair_objectives`` [B, K],
  ``example_id`` [B].
* "sequence": ``tokens``, ``mask``, ``loss_mask`` [B, L], ``prompt_tokens``, ``prompt_mask``
  [B, Lp], ``example_id`` [B]; with ``sequence_responses="responses"`` one row per scored response,
  plus ``scores``, ``score_mask`` [B, K] and ``response_index`` [B].
* "prompt": ``prompt_tokens``, ``prompt_mask`` [B, Lp], ``example_id`` [B] (generation, adapter).

Every kind carries ``extra_fields`` (per-example numeric fields) as float32 [B, ...]. ``loss_mask``
is 1 on response tokens including the EOS. ``example_id`` is the row index in the source (-1 on
the filler rows of a padded last batch, whose masks are all 0).

Shapes: L = the longest row of the GLOBAL batch rounded up to a multiple of ``bucket_multiple``
(at most round_up(max_prompt_len + max_response_len)); Lp likewise from the prompts (at most
round_up(max_prompt_len)). So there are at most ceil(max_total / multiple) distinct L values, and
every host of a multi-host run gets the same shapes.

Order: grain ``MapDataset`` over the row indices -> ``shuffle(seed)`` (a fresh permutation each
epoch) -> ``repeat(num_epochs)`` -> ``batch(global batch)``; each host then collates only its rows
(``rows`` slice, or the contiguous block ``process_index`` of ``process_count``). The iterator state
is grain's (the index of the next global batch) plus a fingerprint of the data and config, so a
resumed run sees exactly the batches it would have seen, even with a different number of hosts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from pro_jax.data.errors import DataError
from pro_jax.data.tokenize import encode, normalize_messages, pad_id, resolve_template, truncate_prompt
from pro_jax.data.validate import validate_example

KINDS = ("pair", "sequence", "prompt")
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How examples become batches.

  Attributes:
    kind: "pair" | "sequence" | "prompt" (see the module docstring).
    batch_size: GLOBAL batch size (all hosts together).
    max_prompt_len: prompts are cut from the left to this many tokens.
    max_response_len: responses (EOS included) longer than this are over-long.
    bucket_multiple: pad lengths up to a multiple of this (128 for TPU; small on CPU).
    template: "auto" | "chat" | "plain" (pro_jax.data.tokenize).
    sequence_responses: for kind "sequence": "chosen" (prompt + chosen, e.g. SFT) or "responses"
      (one row per entry of the example's `responses`, with its `scores` / `score_mask`).
    extra_fields: per-example numeric fields passed through as float32 [B, ...].
    strict: over-long rows (and, with ``validate``, invalid rows) raise a DataError (True) or are
      dropped and counted in ``Pipeline.stats`` (False).
    validate: run ``pro_jax.data.validate.validate_example`` on every row first (rows from the tfds
      builders were validated when built; use this for lists made elsewhere).
    shuffle, seed: deterministic shuffling (a new permutation every epoch).
    num_epochs: passes over the data; None = forever.
    drop_remainder: drop the last partial global batch; else it is padded to full size with filler
      rows (example_id -1, masks 0).
    num_threads, prefetch: grain read options (0 / 0 = in the calling thread).
    static_shapes: every batch has the largest bucket shape (L = round_up(max_prompt_len +
      max_response_len), Lp = round_up(max_prompt_len)), so a train step compiles exactly once.
  """

  kind: str = "pair"
  batch_size: int = 16
  max_prompt_len: int = 256
  max_response_len: int = 256
  bucket_multiple: int = 128
  template: str = "auto"
  sequence_responses: str = "chosen"
  extra_fields: tuple[str, ...] = ()
  strict: bool = True
  validate: bool = False
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = 1
  drop_remainder: bool = True
  num_threads: int = 0
  prefetch: int = 0
  static_shapes: bool = False

  def __post_init__(self):
    object.__setattr__(self, "extra_fields", tuple(self.extra_fields))
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.sequence_responses not in ("chosen", "responses"):
      raise ValueError(f"sequence_responses must be 'chosen' or 'responses', got {self.sequence_responses!r}")
    for name in ("batch_size", "max_prompt_len", "max_response_len", "bucket_multiple"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // multiple) * multiple


def bucket_length(n: int, multiple: int, cap: int) -> int:
  """Smallest multiple of ``multiple`` >= n (and >= 1), at most round_up(cap, multiple)."""
  return min(round_up(max(int(n), 1), multiple), round_up(cap, multiple))


def pad_right(rows: Sequence[np.ndarray], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, length], mask [B, length]) with each row at the start."""
  tokens = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, r in enumerate(rows):
    tokens[b, :len(r)] = r
    mask[b, :len(r)] = 1
  return tokens, mask


def pad_left(rows: Sequence[np.ndarray], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, length], mask [B, length]) with each row at the end."""
  tokens = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, r in enumerate(rows):
    if len(r):
      tokens[b, length - len(r):] = r
      mask[b, length - len(r):] = 1
  return tokens, mask


def prompt_arrays(tokenizer: Any, prompts: Sequence[Any], max_prompt_len: int, template: str = "auto"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (tokens, mask) [N, round_up(max_prompt_len, 8)] of prompts (schema messages or text)
  rendered with `template`, each cut from the left to `max_prompt_len` tokens (BOS kept): the arrays
  generation, the adapter's features and the evaluation read."""
  messages = [normalize_messages(p, row=i) for i, p in enumerate(prompts)]
  ids, _ = encode(tokenizer, messages, None, template)
  bos = getattr(tokenizer, "bos_token_id", None)
  rows = [np.asarray(truncate_prompt(i, max_prompt_len, bos), np.int32) for i in ids]
  empty = [i for i, r in enumerate(rows) if len(r) == 0]
  if empty:
    raise ValueError(f"prompts: row {empty[0]} renders to no token (every prompt needs at least one)")
  return pad_left(rows, round_up(max_prompt_len, 8), pad_id(tokenizer))


def _concat(prompt: np.ndarray, response: np.ndarray, length: int, pad: int):
  """One right-padded row: tokens, mask, loss_mask (1 on response tokens incl. EOS)."""
  tokens = np.full(length, pad, np.int32)
  mask = np.zeros(length, np.int32)
  loss = np.zeros(length, np.int32)
  p, r = len(prompt), len(response)
  tokens[:p] = prompt
  tokens[p:p + r] = response
  mask[:p + r] = 1
  loss[p:p + r] = 1
  return tokens, mask, loss


class Pipeline:
  """Tokenizes a random-access source once, then serves deterministic batches with grain.

  Args:
    source: any random-access sequence of schema dicts (a list, a tfds data source, ...).
    tokenizer: a `transformers` tokenizer (needs eos_token_id).
    config: PipelineConfig.
    name: the file / dataset name used in DataError messages.
    process_index, process_count: this host and the number of hosts (default: jax's); this host
      collates the contiguous block ``process_index`` of the global batch.
    rows: this host's rows of the global batch (overrides process_index / process_count), e.g.
      ``pro_jax.sharding.host_batch_rows(batch_size, mesh)``.

  Attributes: ``stats`` (rows read, usable records, dropped over-long, skipped without a pair, and
  with ``validate`` the invalid rows dropped per reason code),
  ``num_batches`` (None when num_epochs is None), ``rows`` (this host's slice), ``fingerprint``.
  Rows are numbered from 1 in errors. Over-long checks and field checks happen here, up front.
  """

  def __init__(self, source: Sequence[Any], tokenizer: Any, config: PipelineConfig, *,
               name: str | None = None, process_index: int | None = None,
               process_count: int | None = None, rows: slice | np.ndarray | None = None):
    self.config, self.tokenizer, self.name = config, tokenizer, name
    self.template = resolve_template(tokenizer, config.template)
    self.pad_id = pad_id(tokenizer)
    self.bos_id = getattr(tokenizer, "bos_token_id", None)
    B = config.batch_size
    if rows is None:
      if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
      if B % process_count:
        raise ValueError(f"batch_size {B} is not divisible by process_count {process_count}")
      per = B // process_count
      rows = slice(process_index * per, (process_index + 1) * per)
    if isinstance(rows, slice):
      start, stop, step = rows.indices(B)
      if step != 1 or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous slice of the batch, got {rows}")
      self.rows = slice(start, stop)
    else:  # sorted row ids (pro_jax.sharding.host_batch_rows on meshes with non-contiguous rows)
      ids = np.asarray(rows, np.int64)
      if ids.ndim != 1 or not len(ids) or ids.min() < 0 or ids.max() >= B or np.any(np.diff(ids) <= 0):
        raise ValueError(f"rows must be sorted distinct row ids in [0, {B}), got {rows}")
      self.rows = ids
    self._read(source)
    self._build()

  # -- tokenization (once, eagerly: errors surface before anything compiles or writes) ----------

  def _err(self, msg: str, i: int, field: str | None, reason: str | None = None) -> DataError:
    return DataError(msg, file=self.name, row=i + 1, field=field, reason=reason)

  def _get(self, ex: Any, key: str, i: int) -> Any:
    try:
      return ex[key]
    except (KeyError, TypeError):
      raise self._err("missing field", i, key, "missing_field") from None

  def _numeric(self, value: Any, i: int, field: str) -> np.ndarray:
    try:
      arr = np.asarray(value, np.float32)
    except (TypeError, ValueError):
      raise self._err(f"expected numbers, got {type(value).__name__}", i, field, "wrong_type") from None
    if not np.all(np.isfinite(arr)):
      raise self._err("non-finite number", i, field, "non_finite_score")
    return arr

  def _read(self, source: Sequence[Any]) -> None:
    c = self.config
    kind, by_response = c.kind, (c.kind == "sequence" and c.sequence_responses == "responses")
    stats: dict[str, Any] = {"rows": len(source), "records": 0, "dropped_over_long": 0,
                             "skipped_no_pair": 0}
    if c.validate:
      stats["dropped_invalid"] = {}
    prompts, texts, owners = [], [], []  # owners: (row, response_index or -1/-2 for chosen/rejected)
    meta: dict[int, dict[str, Any]] = {}
    extra_shapes: dict[str, tuple] = {}
    k_width = None
    for i in range(len(source)):
      ex = source[i]
      if c.validate:
        try:
          validate_example(ex, file=self.name, row=i + 1)
        except DataError as err:
          if c.strict:
            raise
          reason = err.reason or "invalid"
          stats["dropped_invalid"][reason] = stats["dropped_invalid"].get(reason, 0) + 1
          continue
      messages = normalize_messages(self._get(ex, "prompt", i), file=self.name, row=i + 1)
      if not messages:
        raise self._err("empty prompt", i, "prompt", "empty_field")
      m: dict[str, Any] = {"extras": {}}
      for name in c.extra_fields:
        arr = self._numeric(self._get(ex, name, i), i, name)
        if extra_shapes.setdefault(name, arr.shape) != arr.shape:
          raise self._err(f"shape {arr.shape} differs from earlier rows' {extra_shapes[name]}", i,
                          name, "wrong_shape")
        m["extras"][name] = arr
      if kind == "pair":
        chosen = self._get(ex, "chosen", i)
        rejected = self._get(ex, "rejected", i)
        chosen, rejected = _str(chosen), _str(rejected)
        if not chosen or not rejected:
          stats["skipped_no_pair"] += 1
          continue
        po = self._numeric(self._get(ex, "pair_objectives", i), i, "pair_objectives").reshape(-1)
        if k_width is None:
          k_width = len(po)
        if len(po) != k_width:
          raise self._err(f"{len(po)} objectives, earlier rows have {k_width}", i, "pair_objectives",
                          "wrong_num_objectives")
        m["pair_objectives"] = po
        prompts += [messages, messages]
        texts += [chosen, rejected]
        owners += [(i, -1), (i, -2)]
      elif kind == "sequence" and not by_response:
        chosen = _str(self._get(ex, "chosen", i))
        if not chosen:
          stats["skipped_no_pair"] += 1
          continue
        prompts.append(messages)
        texts.append(chosen)
        owners.append((i, -1))
      elif kind == "sequence":
        responses = [_str(r) for r in self._get(ex, "responses", i)]
        scores = self._numeric(self._get(ex, "scores", i), i, "scores")
        smask = self._numeric(self._get(ex, "score_mask", i), i, "score_mask")
        if responses and (scores.ndim != 2 or scores.shape[0] != len(responses)
                          or smask.shape != scores.shape):
          raise self._err(f"scores {scores.shape} / score_mask {smask.shape} do not match "
                          f"{len(responses)} responses", i, "scores", "wrong_shape")
        if responses:
          if k_width is None:
            k_width = scores.shape[1]
          if scores.shape[1] != k_width:
            raise self._err(f"{scores.shape[1]} objectives, earlier rows have {k_width}", i, "scores",
                            "wrong_num_objectives")
        m["scores"], m["score_mask"] = scores, smask
        for j, r in enumerate(responses):
          prompts.append(messages)
          texts.append(r)
          owners.append((i, j))
      else:
        prompts.append(messages)
        texts.append(None)
        owners.append((i, -3))
      meta[i] = m

    p_ids, r_ids = encode(self.tokenizer, prompts, texts if kind != "prompt" else None, self.template)
    self._k = k_width or 0
    recs: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    for (i, j), p, r in zip(owners, p_ids, r_ids if r_ids is not None else [None] * len(p_ids)):
      prompt = np.asarray(truncate_prompt(p, c.max_prompt_len, self.bos_id), np.int32)
      resp = None if r is None else np.asarray(r, np.int32)
      over = resp is not None and len(resp) > c.max_response_len
      if over:
        field = {-1: "chosen", -2: "rejected"}.get(j, f"responses[{j}]")
        if c.strict:
          raise self._err(f"response is {len(resp)} tokens with EOS, over max_response_len="
                          f"{c.max_response_len} (strict; use strict=False to drop such rows)", i,
                          field, "too_long")
      if j == -1 and kind == "pair":
        pending = {"row": i, "prompt": prompt, "chosen": resp, "over": over}
        continue
      if j == -2:
        assert pending is not None and pending["row"] == i
        if over or pending["over"]:
          stats["dropped_over_long"] += 1
        else:
          recs.append({"row": i, "prompt": prompt, "chosen": pending["chosen"], "rejected": resp})
        pending = None
        continue
      if over:
        stats["dropped_over_long"] += 1
        continue
      recs.append({"row": i, "prompt": prompt, "response": resp, "response_index": j})
    if not recs:
      raise ValueError(f"{self.name or 'source'}: no usable rows for a {kind!r} pipeline "
                       f"({stats})")
    stats["records"] = len(recs)
    self.stats = stats
    self._recs, self._meta = recs, meta
    self._extra_shapes = {n: extra_shapes.get(n, ()) for n in c.extra_fields}
    self._prompt_len = np.array([len(r["prompt"]) for r in recs], np.int64)
    if kind == "pair":
      self._seq_len = np.array([len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"]))
                                for r in recs], np.int64)
    elif kind == "sequence":
      self._seq_len = np.array([len(r["prompt"]) + len(r["response"]) for r in recs], np.int64)
    else:
      self._seq_len = self._prompt_len

  # -- grain dataset -----------------------------------------------------------------------------

  def _build(self) -> None:
    c = self.config
    n = len(self._recs)
    ds = grain.MapDataset.range(n)
    if c.shuffle:
      ds = ds.shuffle(seed=c.seed)
    if c.num_epochs is None:
      ds = ds.repeat(None)
    elif c.num_epochs > 1:
      ds = ds.repeat(c.num_epochs)
    ds = ds.batch(c.batch_size, drop_remainder=c.drop_remainder)
    self.num_batches = None if c.num_epochs is None else len(ds)
    if self.num_batches == 0:
      raise ValueError(f"{self.name or 'source'}: {n} usable rows x {c.num_epochs} epochs give no "
                       f"full batch of {c.batch_size} (drop_remainder=True)")
    self.dataset = ds.map(self.host_batch)
    self.fingerprint = self._fingerprint()

  def _fingerprint(self) -> str:
    h = hashlib.sha256()
    cfg = dataclasses.asdict(self.config)
    for k in ("num_threads", "prefetch"):
      cfg.pop(k)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps([self.template, len(self._recs)]).encode())
    for r in self._recs:
      h.update(np.int64(r["row"]).tobytes())
      for key in ("prompt", "chosen", "rejected", "response"):
        if r.get(key) is not None:
          h.update(r[key].tobytes())
          h.update(b"|")
    return h.hexdigest()[:16]

  def host_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """This host's rows of the global batch made of records ``indices`` (padded with -1 to B)."""
    c = self.config
    idx = np.full(c.batch_size, -1, np.int64)
    idx[:len(indices)] = indices
    real = idx[idx >= 0]
    cap = c.max_prompt_len + (c.max_response_len if c.kind != "prompt" else 0)
    if c.static_shapes:
      L, Lp = round_up(cap, c.bucket_multiple), round_up(c.max_prompt_len, c.bucket_multiple)
    else:
      L = bucket_length(self._seq_len[real].max(), c.bucket_multiple, cap)
      Lp = bucket_length(self._prompt_len[real].max(), c.bucket_multiple, c.max_prompt_len)
    mine = idx[self.rows]
    return self._collate(mine, L, Lp)

  def _collate(self, idx: np.ndarray, L: int, Lp: int) -> dict[str, np.ndarray]:
    c, pad = self.config, self.pad_id
    B = len(idx)
    empty = np.zeros(0, np.int32)
    recs = [self._recs[i] if i >= 0 else None for i in idx]
    out: dict[str, np.ndarray] = {}
    prompts = [r["prompt"] if r is not None else empty for r in recs]
    out["prompt_tokens"], out["prompt_mask"] = pad_left(prompts, Lp, pad)
    if c.kind == "pair":
      for side in ("chosen", "rejected"):
        t = np.full((B, L), pad, np.int32)
        m = np.zeros((B, L), np.int32)
        lm = np.zeros((B, L), np.int32)
        for b, r in enumerate(recs):
          if r is not None:
            t[b], m[b], lm[b] = _concat(r["prompt"], r[side], L, pad)
        out[f"{side}_tokens"], out[f"{side}_mask"], out[f"{side}_loss_mask"] = t, m, lm
      po = np.zeros((B, self._k), np.float32)
      for b, r in enumerate(recs):
        if r is not None:
          po[b] = self._meta[r["row"]]["pair_objectives"]
      out["pair_objectives"] = po
    elif c.kind == "sequence":
      t = np.full((B, L), pad, np.int32)
      m = np.zeros((B, L), np.int32)
      lm = np.zeros((B, L), np.int32)
      for b, r in enumerate(recs):
        if r is not None:
          t[b], m[b], lm[b] = _concat(r["prompt"], r["response"], L, pad)
      out["tokens"], out["mask"], out["loss_mask"] = t, m, lm
      if c.sequence_responses == "responses":
        s = np.zeros((B, self._k), np.float32)
        sm = np.zeros((B, self._k), np.float32)
        ri = np.full((B,), -1, np.int32)
        for b, r in enumerate(recs):
          if r is not None:
            meta = self._meta[r["row"]]
            s[b] = meta["scores"][r["response_index"]]
            sm[b] = meta["score_mask"][r["response_index"]]
            ri[b] = r["response_index"]
        out["scores"], out["score_mask"], out["response_index"] = s, sm, ri
    out["example_id"] = np.array([r["row"] if r is not None else -1 for r in recs], np.int32)
    for name in c.extra_fields:
      arr = np.zeros((B,) + self._extra_shapes[name], np.float32)
      for b, r in enumerate(recs):
        if r is not None:
          arr[b] = self._meta[r["row"]]["extras"][name]
      out[name] = arr
    return out

  def with_rows(self, rows: slice | np.ndarray) -> "Pipeline":
    """The same tokenized data serving other rows of each global batch (no re-tokenization)."""
    import copy
    other = copy.copy(self)
    B = self.config.batch_size
    if isinstance(rows, slice):
      start, stop, step = rows.indices(B)
      if step != 1 or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous slice of the batch, got {rows}")
      other.rows = slice(start, stop)
    else:
      other.rows = np.asarray(rows, np.int64)
    other._build()
    return other

  def batch_spec(self) -> dict[str, Any]:
    """Shapes / dtypes of one GLOBAL batch (needs static_shapes=True to be the same every step)."""
    import jax
    full = self.with_rows(slice(0, self.config.batch_size))
    b = full.host_batch(np.arange(min(self.config.batch_size, len(self._recs))))
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}

  # -- iteration ---------------------------------------------------------------------------------

  def iterator(self, state: dict[str, Any] | None = None) -> "BatchIterator":
    """A fresh iterator over this host's batches; ``state`` from ``get_state()`` resumes."""
    it = BatchIterator(self)
    if state is not None:
      it.set_state(state)
    return it

  def __iter__(self):
    return self.iterator()

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("an infinite pipeline (num_epochs=None) has no length")
    return self.num_batches


class BatchIterator:
  """Iterator of this host's numpy batches, with a JSON-able ``get_state()`` / ``set_state()``."""

  def __init__(self, pipeline: Pipeline):
    self.pipeline = pipeline
    c = pipeline.config
    read = grain.ReadOptions(num_threads=c.num_threads, prefetch_buffer_size=c.prefetch)
    self._it = iter(pipeline.dataset.to_iter_dataset(read))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "fingerprint": self.pipeline.fingerprint,
            "grain": self._it.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
    if state.get("fingerprint") != self.pipeline.fingerprint:
      raise ValueError(
          f"data iterator state is for another dataset or pipeline config (fingerprint "
          f"{state.get('fingerprint')!r}, this pipeline {self.pipeline.fingerprint!r}); resuming "
          "would not reproduce the batches")
    self._it.set_state(state["grain"])


def _str(x: Any) -> str:
  if x is None:
    return ""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return _str(x.item())
  return str(x)
