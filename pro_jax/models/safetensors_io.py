"""safetensors checkpoint files, at the level of the format: which files a checkpoint directory holds
(one file, or shards plus `model.safetensors.index.json`), every tensor's name, shape and dtype from
the headers alone, slices read from the memory-mapped files, and tensors streamed into a new file
one at a time (so an export never holds a whole model in host memory).

The `safetensors` package reads; writing is done here because its `save_file` takes the whole dict of
arrays at once. What the tensors mean (which parameter of which architecture) is
`pro_jax.models.hf_io`'s and `pro_jax.models.peft_io`'s concern; `pro_jax.models.encoders` reads its
classifiers through the same functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import re
import struct
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from pro_jax.models.hf_config import CheckpointError

# safetensors dtype code <-> numpy dtype, for the float dtypes pro_jax reads and writes
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}
DTYPE_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16",
               np.dtype(np.float64): "F64"}
# (name, shape, dtype, fetch() -> the array) of one tensor to write
Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: pathlib.Path
  shape: tuple[int, ...]
  dtype: str


def checkpoint_files(path: pathlib.Path) -> tuple[list[pathlib.Path], pathlib.Path | None]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
    files = sorted({path / f for f in weight_map.values()})
    for f in files:
      if not f.is_file():
        raise CheckpointError(f"{index}: shard {f.name} is listed but missing from {path}")
    return files, index
  single = path / "model.safetensors"
  if single.is_file():
    return [single], None
  found = sorted(path.glob("*.safetensors"))
  if len(found) == 1:
    return found, None
  if found:
    raise CheckpointError(f"{path}: several .safetensors files {[f.name for f in found]} but no "
                          "model.safetensors.index.json")
  other = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack")]
  hint = f" (found {other}: convert them to safetensors with transformers)" if other else ""
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def read_headers(files: list[pathlib.Path], index: pathlib.Path | None) -> dict[str, TensorInfo]:
  """name -> (file, shape, dtype), from the safetensors headers only (no tensor data is read)."""
  tensors: dict[str, TensorInfo] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="np") as handle:
        for name in handle.keys():
          sl = handle.get_slice(name)
          if name in tensors:
            raise CheckpointError(f"{f}: tensor {name} also in {tensors[name].file.name}")
          tensors[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
    except CheckpointError:
      raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
  if index is not None:
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, fname in weight_map.items():
      if name not in tensors or tensors[name].file.name != fname:
        where = tensors[name].file.name if name in tensors else "no shard"
        raise CheckpointError(f"{index}: maps tensor {name} to {fname}, but it is in {where}")
  return tensors


class TensorReader:
  """Lazily opened safetensors handles; reads slices of (per-layer, transposed) HF tensors."""

  def __init__(self, tensors: dict[str, TensorInfo]):
    self.tensors = tensors
    self._stack = contextlib.ExitStack()
    self._handles: dict[pathlib.Path, Any] = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stack.close()

  def _handle(self, file: pathlib.Path):
    if file not in self._handles:
      self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="np"))
    return self._handles[file]

  def read(self, name: str, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
    """HF tensor `name` at our `index` (slices into our layout: transposed for nn.Linear weights)."""
    sl = self._handle(self.tensors[name].file).get_slice(name)
    if transpose:
      return np.asarray(sl[index[1], index[0]]).T
    return np.asarray(sl[tuple(index)])


def parse_size(size: int | str) -> int:
  """Bytes from 5000000, "5GB" (10^9), "5GiB" (2^30), "200MB", "40KB"... as transformers does."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B)\s*", str(size).upper())
  if not m:
    raise ValueError(f"max_shard_size: cannot parse {size!r} (use e.g. 5GB, 500MB, or an int)")
  value, unit = float(m.group(1)), m.group(2)
  powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
  return int(value * powers[unit])


def write_safetensors(file: pathlib.Path, entries: list[Entry]) -> None:
  """Stream tensors into one safetensors file: header from the shapes, then each tensor's bytes."""
  header: dict[str, Any] = {}
  offset = 0
  for name, shape, dtype, _ in entries:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, fetch in entries:
      arr = np.ascontiguousarray(fetch())
      if arr.shape != tuple(shape) or arr.dtype != dtype:
        raise RuntimeError(f"internal: {name} fetched as {arr.shape} {arr.dtype}, planned {shape} {dtype}")
      f.write(arr.tobytes())
