"""Tiny, deterministic data sources for the engine's tests and the generic `train` command.

The real input pipeline lives in `pro_jax.data`; these follow the same protocol so the trainer does
not care which it gets: an iterator of numpy batch dicts (this host's rows of the global batch, see
`pro_jax.sharding.host_batch_rows`) with `get_state()` -> JSON-able dict and `set_state(state)`.
Batch `k` is a pure function of (seed, k), so a restored iterator continues exactly.

* `SyntheticLM`: sequence batches (`tokens`, `mask`, `loss_mask`) of learnable arithmetic
  progressions mod V, right-padded to random lengths (so token-weighted averaging matters).
* `SyntheticPairs`: pair batches (`chosen_*`, `rejected_*`, `prompt_*`): the chosen response
  continues the prompt's progression, the rejected one is random tokens.
* `TokenFileLM`: windows of a flat token file (`.npy`, or raw `.bin` of uint16) at random offsets.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from pro_jax.configs import ConfigError  # a bad data.path is a config problem: reported before compiling


class _Source:
  """Shared iterator plumbing: `batch(k)` gives the k-th global batch; rows are this host's."""

  def __init__(self, seed: int, global_batch: int, rows: slice | None = None):
    self.seed, self.global_batch = int(seed), int(global_batch)
    self.rows = rows if rows is not None else slice(0, global_batch)
    self.position = 0

  def _rng(self, k: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, k])

  def batch(self, k: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = {name: x[self.rows] for name, x in self.batch(self.position).items()}
    self.position += 1
    return out

  def get_state(self) -> dict[str, Any]:
    return {"position": self.position, "seed": self.seed}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"data state is for seed {state['seed']}, this source has seed {self.seed}")
    self.position = int(state["position"])


def _progressions(rng: np.random.Generator, n: int, length: int, vocab: int) -> np.ndarray:
  start = rng.integers(0, vocab, size=(n, 1))
  stride = rng.integers(1, 4, size=(n, 1))
  return ((start + stride * np.arange(length)[None]) % vocab).astype(np.int32)


class SyntheticLM(_Source):
  def __init__(self, seed: int, global_batch: int, seq_len: int, vocab_size: int, rows: slice | None = None,
               min_len: int | None = None):
    super().__init__(seed, global_batch, rows)
    self.seq_len, self.vocab = int(seq_len), int(vocab_size)
    self.min_len = int(min_len) if min_len is not None else max(2, seq_len // 4)

  def batch(self, k: int) -> dict[str, np.ndarray]:
    rng = self._rng(k)
    tokens = _progressions(rng, self.global_batch, self.seq_len, self.vocab)
    lengths = rng.integers(self.min_len, self.seq_len + 1, size=(self.global_batch, 1))
    mask = (np.arange(self.seq_len)[None] < lengths).astype(np.int32)
    tokens = tokens * mask
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


class SyntheticPairs(_Source):
  def __init__(self, seed: int, global_batch: int, seq_len: int, vocab_size: int, prompt_len: int,
               rows: slice | None = None):
    super().__init__(seed, global_batch, rows)
    if not 0 < prompt_len < seq_len - 1:
      raise ValueError(f"prompt_len must be in (0, seq_len - 1), got {prompt_len} for seq_len {seq_len}")
    self.seq_len, self.vocab, self.prompt_len = int(seq_len), int(vocab_size), int(prompt_len)

  def batch(self, k: int) -> dict[str, np.ndarray]:
    rng = self._rng(k)
    B, L, Lp = self.global_batch, self.seq_len, self.prompt_len
    chosen = _progressions(rng, B, L, self.vocab)
    rejected = chosen.copy()
    rejected[:, Lp:] = rng.integers(0, self.vocab, size=(B, L - Lp))
    out = {}
    pos = np.arange(L)[None]
    for name, toks in (("chosen", chosen), ("rejected", rejected)):
      length = rng.integers(Lp + 2, L + 1, size=(B, 1))
      mask = (pos < length).astype(np.int32)
      out[f"{name}_tokens"] = toks * mask
      out[f"{name}_mask"] = mask
      out[f"{name}_loss_mask"] = (mask * (pos >= Lp)).astype(np.int32)
    out["prompt_tokens"] = chosen[:, :Lp]
    out["prompt_mask"] = np.ones((B, Lp), np.int32)
    return out


class TokenFileLM(_Source):
  """Random windows of seq_len tokens from a flat token file (`.npy` of ints, or `.bin` of uint16)."""

  def __init__(self, path: str, seed: int, global_batch: int, seq_len: int, vocab_size: int,
               rows: slice | None = None):
    super().__init__(seed, global_batch, rows)
    p = pathlib.Path(path)
    if not p.is_file():
      raise ConfigError(f"data.path: token file {path} does not exist")
    self.tokens = np.load(p, mmap_mode="r") if p.suffix == ".npy" else np.memmap(p, dtype=np.uint16, mode="r")
    if self.tokens.ndim != 1 or len(self.tokens) <= seq_len:
      raise ConfigError(f"{path}: expected a flat token array longer than seq_len={seq_len}, "
                       f"got shape {self.tokens.shape}")
    head = np.asarray(self.tokens[: min(len(self.tokens), 1 << 20)])
    bad = np.flatnonzero((head < 0) | (head >= vocab_size))
    if bad.size:
      raise ConfigError(f"{path}: token #{bad[0]} has id {head[bad[0]]}, outside [0, model.vocab_size={vocab_size})")
    self.seq_len = int(seq_len)

  def batch(self, k: int) -> dict[str, np.ndarray]:
    starts = self._rng(k).integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)
    tokens = np.stack([np.asarray(self.tokens[s:s + self.seq_len]) for s in starts]).astype(np.int32)
    mask = np.ones_like(tokens)
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
