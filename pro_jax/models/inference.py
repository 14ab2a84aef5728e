"""Batched inference outside the train step: one jitted function over fixed-size batches.

    fn = jax.jit(lambda variables, tokens, mask: model.apply(variables, tokens, mask).scores)
    scores_NxK = batched_apply(fn, variables, {"tokens": tokens_NxL, "mask": mask_NxL}, batch_size=64)

The weights are an ARGUMENT of the jitted function, never closed over (a closed-over array is baked
into the compiled program as a constant: fine for a toy model, gigabytes of HLO at 7B, and a
recompile for every new set of weights). Every call sees the same batch shape (the last batch is
padded by repeating its last row, `pad_rows`), so `fn` compiles once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def pad_rows(arrays: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
  """Each array (None passes through) padded along its first axis to `batch_size` rows by repeating
  its last row (a padded row is a real row's copy, so it is finite wherever the real one is)."""
  out = {}
  for name, x in arrays.items():
    if x is None or len(x) >= batch_size:
      out[name] = x
      continue
    x = np.asarray(x)
    out[name] = np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), 0)])
  return out


def batched_apply(fn: Callable[..., Any], variables: Any, arrays: Mapping[str, Any], batch_size: int) -> Any:
  """`fn(variables, **batch)` over the leading axis of `arrays` in batches of `batch_size` rows.

  Returns the outputs (a pytree of numpy arrays) concatenated and trimmed to the number of rows.
  """
  n = len(next(x for x in arrays.values() if x is not None))
  outs = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    chunk = pad_rows({k: None if v is None else v[start:stop] for k, v in arrays.items()}, batch_size)
    out = jax.device_get(fn(variables, **chunk))
    outs.append(jax.tree.map(lambda y: np.asarray(y)[:stop - start], out))
  return jax.tree.map(lambda *ys: np.concatenate(ys, 0), *outs)


__all__ = ["pad_rows", "batched_apply"]


def params_fingerprint(variables: Any) -> str:
  """A short hash of a parameter tree: paths, shapes, dtypes and per-leaf sums (computed on device)."""
  leaves = jax.tree_util.tree_leaves_with_path(variables)
  sums = jax.device_get([jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                         for _, x in leaves])
  h = hashlib.sha256()
  for (path, x), s in zip(leaves, sums):
    h.update(f"{jax.tree_util.keystr(path)}|{tuple(x.shape)}|{x.dtype}|".encode())
    h.update(np.asarray(s, np.float32).tobytes())
  return h.hexdigest()[:16]
