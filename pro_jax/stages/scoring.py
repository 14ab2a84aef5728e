"""Objectives as scorers: programmatic rewards, learned multi-head reward models, imported HF
sequence classifiers, stacked together and cached on disk.

Every scorer has ``objectives`` (K names) and ``score(prompts, responses) -> float32 [N, K]``;
prompts are schema prompts (a list of {role, content}) or plain user strings. The embedded task's
`pro_jax.data.synthetic.SyntheticRewards` already has this interface.

    helpful = hf_reward_scorer("ckpts/gpt2-helpful-rm", "helpful")          # imported, K = 1
    trained = load_reward_model("runs/rm")                                  # trained heads, K = 2
    scorer = CachedScorer(StackedScorer([helpful, trained, SyntheticRewards()]), "runs/scores.sqlite")
    scores_NxK = scorer.score(prompts, responses)                           # objectives concatenated
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.data import files
from pro_jax.data.pipeline import pad_right, round_up
from pro_jax.data.tokenize import encode, normalize_messages, pad_id, truncate_prompt
from pro_jax.models import Transformer
from pro_jax.models.heads import head_to_params
from pro_jax.models.hf_io import load_hf_model
from pro_jax.models.hub import is_hub_id
from pro_jax.models.inference import batched_apply, params_fingerprint
from pro_jax.models.tokenizer import load_tokenizer


class Scorer(Protocol):
  objectives: Sequence[str]

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    ...


def scorer_key(scorer: Any) -> str:
  """A string identifying what a scorer computes (for disk caches): its `key`, else its type and config."""
  key = getattr(scorer, "key", None)
  if key:
    return str(key)
  cfg = getattr(scorer, "config", None)
  return json.dumps([type(scorer).__name__, list(getattr(scorer, "objectives", ())), repr(cfg) if cfg is not None else None])


def tokenize_for_scoring(tokenizer: Any, prompts: Sequence[Any], responses: Sequence[str], *,
                         max_prompt_len: int, max_len: int, template: str = "auto",
                         append_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded (tokens [N, max_len], mask [N, max_len]) of prompt + response (+ EOS).

  The prompt is cut from the left to `max_prompt_len` (pipeline policy); a response that does not
  fit is cut from the right but keeps its final EOS (with `append_eos`), so any generated text can be
  scored. Trained reward models see EOS at the end (the pipeline appends it); many imported HF reward
  models were trained without it (`append_eos=False`).
  """
  if max_prompt_len >= max_len:
    raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room for a response in max_len={max_len}")
  messages = [normalize_messages(p) for p in prompts]
  p_ids, r_ids = encode(tokenizer, messages, list(responses), template)
  bos = getattr(tokenizer, "bos_token_id", None)
  rows = []
  for p, r in zip(p_ids, r_ids):
    p = truncate_prompt(p, max_prompt_len, bos)
    if not append_eos:
      r = r[:-1]
    room = max_len - len(p)
    if len(r) > room:
      r = r[:room - 1] + r[-1:] if append_eos else r[:room]
    rows.append(np.asarray(p + r, np.int32))
  return pad_right(rows, max_len, pad_id(tokenizer))


class RewardModelScorer:
  """A reward model (a `Transformer` with head="score") as a scorer.

  ``heads`` picks and orders the model's score columns (default all); ``objectives`` names them.
  An imported HF reward model (num_labels=1) is one objective; a trained multi-head RM is K.
  Scoring runs in jitted fixed-size batches (the last one padded), so it compiles once; the
  parameters are arguments of the jitted function (not constants baked into it).
  `max_len` is rounded up to a multiple of 8, except past a learned-position model's max_seq_len.
  """

  def __init__(self, model: Transformer, params: Any, tokenizer: Any, objectives: Sequence[str], *,
               heads: Sequence[int] | None = None, batch_size: int = 64, max_prompt_len: int = 256,
               max_len: int = 512, template: str = "auto", append_eos: bool = True, name: str = "rm"):
    cfg = model.config
    if cfg.head != "score":
      raise ValueError(f"RewardModelScorer needs a model with head='score', got head={cfg.head!r}")
    self.heads = tuple(range(cfg.num_labels)) if heads is None else tuple(int(h) for h in heads)
    if len(objectives) != len(self.heads):
      raise ValueError(f"{len(objectives)} objective names for {len(self.heads)} score heads")
    if any(h < 0 or h >= cfg.num_labels for h in self.heads):
      raise ValueError(f"heads {self.heads} out of range for num_labels={cfg.num_labels}")
    self.max_len = round_up(max_len, 8)
    if cfg.arch == "gpt2" and self.max_len > cfg.max_seq_len:  # learned positions: no extrapolation
      if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's {cfg.max_seq_len} learned positions")
      self.max_len = int(max_len)
    if max_prompt_len >= self.max_len:
      raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room for a response in max_len={self.max_len}")
    self.model, self.tokenizer = model, tokenizer
    # a LoRA-trained reward model's score head back in "params" (`pro_jax.stages.rm`)
    self.variables = head_to_params(params if "params" in params else {"params": params}, "score")
    self.params = self.variables
    self.objectives = tuple(objectives)
    self.batch_size, self.max_prompt_len = int(batch_size), int(max_prompt_len)
    self.template, self.append_eos, self.name = template, bool(append_eos), name
    heads_K = jnp.asarray(self.heads)
    self._fn = jax.jit(lambda variables, tokens, mask: model.apply(variables, tokens, mask).scores[:, heads_K])
    self._fingerprint: str | None = None

  @property
  def key(self) -> str:
    """Identifies this scorer in a disk cache: name, objectives, heads, lengths, template, EOS,
    tokenizer and a fingerprint of the weights (two different models never share a key)."""
    if self._fingerprint is None:
      self._fingerprint = params_fingerprint(self.variables)
    tok = [type(self.tokenizer).__name__, len(self.tokenizer), getattr(self.tokenizer, "name_or_path", "")]
    return json.dumps([self.name, self.objectives, self.heads, self.max_prompt_len, self.max_len, self.template,
                       self.append_eos, tok, self._fingerprint])

  def tokenize(self, prompts: Sequence[Any], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, max_len], mask [N, max_len]) exactly as `score` feeds them to the model."""
    return tokenize_for_scoring(self.tokenizer, prompts, responses, max_prompt_len=self.max_prompt_len,
                                max_len=self.max_len, template=self.template, append_eos=self.append_eos)

  def score_tokens(self, tokens_NxL: np.ndarray, mask_NxL: np.ndarray) -> np.ndarray:
    """Scores [N, K] of right-padded token arrays (any N; fixed-size batches, the last one padded)."""
    if not len(tokens_NxL):
      return np.zeros((0, len(self.heads)), np.float32)
    scores = batched_apply(self._fn, self.variables, {"tokens": tokens_NxL, "mask": mask_NxL}, self.batch_size)
    return np.asarray(scores, np.float32)

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    n = len(responses)
    if len(prompts) != n:
      raise ValueError(f"got {len(prompts)} prompts and {n} responses")
    out = np.zeros((n, len(self.heads)), np.float32)
    chunk = self.batch_size * 16  # tokenize in chunks (bounded host memory)
    for start in range(0, n, chunk):
      stop = min(start + chunk, n)
      tokens, mask = self.tokenize(prompts[start:stop], responses[start:stop])
      out[start:stop] = self.score_tokens(tokens, mask)
    return out


def hf_reward_scorer(directory: str | os.PathLike, objectives: str | Sequence[str], tokenizer: Any = None, *,
                     heads: Sequence[int] | None = None, batch_size: int = 64, max_prompt_len: int = 256,
                     max_len: int = 512, template: str = "auto", append_eos: bool = False,
                     dtype: str = "float32", name: str | None = None) -> RewardModelScorer:
  """An imported HF sequence-classification reward model (e.g. Ray2333/gpt2-large-helpful-reward_model)
  as a scorer, usable next to trained heads and programmatic rewards in a `StackedScorer`.

  objectives: one name (a num_labels=1 classifier) or one per selected head. tokenizer: default the
  directory's own (`pro_jax.load_tokenizer`). append_eos=False: score the text as such RMs are usually
  called (``tokenizer(prompt + response)``, no EOS appended); the score is read at the last real token.
  The checkpoint must be a sequence classifier (a causal LM would get a random score head).
  """
  model, params = load_hf_model(directory, dtype=dtype, param_dtype=dtype)
  if model.config.head != "score":
    raise ValueError(f"{directory}: not a sequence-classification checkpoint (its head is {model.config.head!r}); "
                     "an imported reward model needs its trained score head")
  if tokenizer is None:
    tokenizer = load_tokenizer(directory)
  names = [objectives] if isinstance(objectives, str) else list(objectives)
  if heads is None and len(names) != model.config.num_labels:
    raise ValueError(f"{directory}: {model.config.num_labels} score labels, {len(names)} objective names given "
                     "(pass heads= to pick labels)")
  return RewardModelScorer(model, {"params": params}, tokenizer, names, heads=heads, batch_size=batch_size,
                           max_prompt_len=max_prompt_len, max_len=max_len, template=template, append_eos=append_eos,
                           name=name or f"hf:{_source_name(directory)}")


def _source_name(directory: Any) -> str:
  """A local directory's absolute path; a Hub id as it is (``ORG/NAME[@REV]``)."""
  return str(directory) if is_hub_id(directory) else str(files.as_path(directory))


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
    return json.dumps([scorer_key(s) for s in self.scorers])

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
    parts = []
    for s in self.scorers:
      out = np.asarray(s.score(prompts, responses), np.float32)
      if out.shape != (len(responses), len(s.objectives)):
        raise ValueError(f"scorer {type(s).__name__} returned shape {out.shape}, expected "
                         f"{(len(responses), len(s.objectives))}")
      parts.append(out)
    return np.concatenate(parts, axis=1)


class CachedScorer:
  """A scorer whose results are cached in an SQLite file, keyed by (scorer key, prompt, response).

  Only the pairs not yet in the cache are scored (in one batched call, each distinct pair once); the
  cache survives runs and is shared safely by several processes (SQLite locking; a duplicate key
  written twice holds the same value), so re-running a stage or the evaluation does not score the
  same responses twice. `hits` counts pairs answered without scoring them (from the file, or a
  repeat within the same call), `misses` the pairs the wrapped scorer scored.

  A `gs://` path (SQLite needs a local file): the cache is a local mirror (`pro_jax.data.files.Mirror`)
  filled from the workdir's copy when the scorer is made and copied back to the workdir after every
  call that scored new pairs, by process 0 only (the other hosts of a slice keep theirs local).
  """

  def __init__(self, scorer: Any, path: str | os.PathLike, key: str | None = None, *, timeout: float = 60.0):
    self.scorer = scorer
    self.objectives = tuple(scorer.objectives)
    self.mirror = files.Mirror(path, enabled=jax.process_index() == 0)
    self.path = os.fspath(self.mirror.local)
    self.key = key or scorer_key(scorer)
    self.timeout = timeout
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with self._connect() as db, db:
      db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    self.hits = self.misses = 0

  def _connect(self):
    return contextlib.closing(sqlite3.connect(self.path, timeout=self.timeout))

  def _keys(self, prompts, responses) -> list[str]:
    out = []
    for p, r in zip(prompts, responses):
      h = hashlib.sha256()
      h.update(self.key.encode())
      h.update(b"\0")
      h.update(json.dumps(normalize_messages(p), sort_keys=True).encode())
      h.update(b"\0")
      h.update(str(r).encode("utf-8", "surrogatepass"))
      out.append(h.hexdigest())
    return out

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
    keys = self._keys(prompts, responses)
    K = len(self.objectives)
    found: dict[str, np.ndarray] = {}
    unique = list(dict.fromkeys(keys))
    with self._connect() as db:
      for i in range(0, len(unique), 500):
        chunk = unique[i:i + 500]
        q = f"SELECT key, value FROM scores WHERE key IN ({','.join('?' * len(chunk))})"
        for k, v in db.execute(q, chunk):
          value = np.frombuffer(v, np.float32)
          if value.shape != (K,):
            raise ValueError(f"{self.path}: cached value for key {k} has {value.size} objectives, expected {K}")
          found[k] = value
    first_of: dict[str, int] = {}
    for i, k in enumerate(keys):
      if k not in found:
        first_of.setdefault(k, i)
    idx = list(first_of.values())
    if idx:
      new = np.asarray(self.scorer.score([prompts[i] for i in idx], [responses[i] for i in idx]), np.float32)
      if new.shape != (len(idx), K):
        raise ValueError(f"scorer returned shape {new.shape}, expected {(len(idx), K)}")
      with self._connect() as db, db:  # one transaction; a concurrent writer of the same key wrote the same value
        db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)",
                       [(keys[i], new[j].tobytes()) for j, i in enumerate(idx)])
      for j, i in enumerate(idx):
        found[keys[i]] = new[j]
      self.mirror.push()  # gs://: the workdir's copy (no-op for a local path)
    self.misses += len(idx)
    self.hits += len(keys) - len(idx)
    out = np.zeros((len(keys), K), np.float32)
    for i, k in enumerate(keys):
      out[i] = found[k]
    return out
