"""Objectives as scorers: programmatic rewards, learned multi-head reward models, imported HF
sequence classifiers, stacked together and cached on disk.

Every scorer has ``objectives`` (K names) and ``score(prompts, responses) -> float32 [N, K]``;
prompts are schema prompts (a list of {role, content}) or plain user strings. The embedded task's
`pro_jax.data.synthetic.SyntheticRewards` already has this interface.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.data.pipeline import pad_right, round_up
from pro_jax.data.tokenize import encode, normalize_messages, pad_id, truncate_prompt
from pro_jax.models import Transformer


class Scorer(Protocol):
  objectives: Sequence[str]

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    ...


def tokenize_for_scoring(tokenizer: Any, prompts: Sequence[Any], responses: Sequence[str], *,
                         max_prompt_len: int, max_len: int, template: str = "auto") -> tuple[np.ndarray, np.ndarray]:
  """Right-padded (tokens [N, max_len], mask [N, max_len]) of prompt + response + EOS.

  The prompt is cut from the left to `max_prompt_len` (pipeline policy); a response that does not
  fit is cut from the right but keeps its final EOS, so any generated text can be scored.
  """
  messages = [normalize_messages(p) for p in prompts]
  p_ids, r_ids = encode(tokenizer, messages, list(responses), template)
  bos = getattr(tokenizer, "bos_token_id", None)
  rows = []
  for p, r in zip(p_ids, r_ids):
    p = truncate_prompt(p, max_prompt_len, bos)
    room = max_len - len(p)
    if len(r) > room:
      r = r[:room - 1] + r[-1:]
    rows.append(np.asarray(p + r, np.int32))
  return pad_right(rows, max_len, pad_id(tokenizer))


class RewardModelScorer:
  """A reward model (a `Transformer` with head="score") as a scorer.

  ``heads`` picks and orders the model's score columns (default all); ``objectives`` names them.
  An imported HF reward model (num_labels=1) is one objective; a trained multi-head RM is K.
  Scoring runs in jitted fixed-size batches (the last one padded), so it compiles once.
  """

  def __init__(self, model: Transformer, params: Any, tokenizer: Any, objectives: Sequence[str], *,
               heads: Sequence[int] | None = None, batch_size: int = 64, max_prompt_len: int = 256,
               max_len: int = 512, template: str = "auto", name: str = "rm"):
    if model.config.head != "score":
      raise ValueError(f"RewardModelScorer needs a model with head='score', got head={model.config.head!r}")
    self.heads = tuple(range(model.config.num_labels)) if heads is None else tuple(heads)
    if len(objectives) != len(self.heads):
      raise ValueError(f"{len(objectives)} objective names for {len(self.heads)} score heads")
    if any(h < 0 or h >= model.config.num_labels for h in self.heads):
      raise ValueError(f"heads {self.heads} out of range for num_labels={model.config.num_labels}")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.objectives = tuple(objectives)
    self.batch_size, self.max_prompt_len = batch_size, max_prompt_len
    self.max_len = round_up(max_len, 8)
    self.template, self.name = template, name
    variables = params if "params" in params else {"params": params}
    heads_K = jnp.asarray(self.heads)
    self._fn = jax.jit(lambda t, m: model.apply(variables, t, m).scores[:, heads_K])

  @property
  def key(self) -> str:
    """Identifies this scorer in a disk cache (name, objectives, heads, lengths)."""
    return json.dumps([self.name, self.objectives, self.heads, self.max_prompt_len, self.max_len, self.template])

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    n = len(responses)
    if len(prompts) != n:
      raise ValueError(f"got {len(prompts)} prompts and {n} responses")
    out = np.zeros((n, len(self.heads)), np.float32)
    B = self.batch_size
    for start in range(0, n, B):
      stop = min(start + B, n)
      tokens, mask = tokenize_for_scoring(self.tokenizer, prompts[start:stop], responses[start:stop],
                                          max_prompt_len=self.max_prompt_len, max_len=self.max_len,
                                          template=self.template)
      if stop - start < B:  # pad to the compiled batch size
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], B - (stop - start), 0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], B - (stop - start), 0)])
      out[start:stop] = np.asarray(self._fn(tokens, mask))[:stop - start]
    return out


class StackedScorer:
  """Several scorers side by side: objectives concatenated in order."""

  def __init__(self, scorers: Sequence[Any]):
    if not scorers:
      raise ValueError("StackedScorer needs at least one scorer")
    self.scorers = list(scorers)
    self.objectives = tuple(o for s in self.scorers for o in s.objectives)
    if len(set(self.objectives)) != len(self.objectives):
      raise ValueError(f"duplicate objective names across scorers: {self.objectives}")

  @property
  def key(self) -> str:
    return json.dumps([getattr(s, "key", type(s).__name__) for s in self.scorers])

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(s.score(prompts, responses), np.float32) for s in self.scorers], axis=1)


class CachedScorer:
  """A scorer whose results are cached in an SQLite file, keyed by (scorer key, prompt, response).

  Only the pairs not yet in the cache are scored (in one batched call); the cache survives runs, so
  re-running a stage or the evaluation does not score the same responses twice.
  """

  def __init__(self, scorer: Any, path: str | os.PathLike, key: str | None = None):
    self.scorer = scorer
    self.objectives = tuple(scorer.objectives)
    self.path = os.fspath(path)
    self.key = key or getattr(scorer, "key", None) or type(scorer).__name__
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with sqlite3.connect(self.path) as db:
      db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    self.hits = self.misses = 0

  def _keys(self, prompts, responses) -> list[str]:
    out = []
    for p, r in zip(prompts, responses):
      h = hashlib.sha256()
      h.update(self.key.encode())
      h.update(b"\0")
      h.update(json.dumps(normalize_messages(p), sort_keys=True).encode())
      h.update(b"\0")
      h.update(r.encode("utf-8", "surrogatepass"))
      out.append(h.hexdigest())
    return out

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    keys = self._keys(prompts, responses)
    K = len(self.objectives)
    out = np.zeros((len(keys), K), np.float32)
    found: dict[str, np.ndarray] = {}
    with sqlite3.connect(self.path) as db:
      unique = list(dict.fromkeys(keys))
      for i in range(0, len(unique), 500):
        chunk = unique[i:i + 500]
        q = f"SELECT key, value FROM scores WHERE key IN ({','.join('?' * len(chunk))})"
        for k, v in db.execute(q, chunk):
          found[k] = np.frombuffer(v, np.float32)
      todo = [i for i, k in enumerate(keys) if k not in found]
      first_of = {}
      for i in todo:
        first_of.setdefault(keys[i], i)
      idx = list(first_of.values())
      self.hits += len(keys) - len(todo)
      self.misses += len(idx)
      if idx:
        new = np.asarray(self.scorer.score([prompts[i] for i in idx], [responses[i] for i in idx]), np.float32)
        if new.shape != (len(idx), K):
          raise ValueError(f"scorer returned shape {new.shape}, expected {(len(idx), K)}")
        db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)",
                       [(keys[i], new[j].tobytes()) for j, i in enumerate(idx)])
        for j, i in enumerate(idx):
          found[keys[i]] = new[j]
    for i, k in enumerate(keys):
      out[i] = found[k]
    return out
