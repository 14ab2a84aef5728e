"""Device mesh and logical-axis sharding.

The model names every parameter dimension with a logical axis (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``mlp``, ``layers``) and constrains activations with (``batch``, ``length``, ...).
``RULES`` maps those names onto the mesh axes ``(data, fsdp, tensor)``:

* parameters are sharded FSDP-style over ``fsdp`` on their ``embed`` dimension and Megatron-style
  over ``tensor`` on heads / mlp / vocab;
* the batch is split over ``(data, fsdp)``.

A dimension whose size is not divisible by its mesh axes is replicated over them instead (e.g. 4 KV
heads on a tensor axis of 8), so any model runs on any mesh; `param_shardings` reports nothing for
that, `describe_shardings` shows it.

Meshes brought by downstream code may name their axes differently (``Mesh(devices, ("fsdp",))``,
``("data", "model")``). Every function here that takes a mesh and rules first passes the rules
through `rules_for_mesh`: a mesh axis a rule names that the mesh has is kept; a missing one of our
three roles is renamed to the mesh's axis of that role by `MESH_AXIS_ALIASES` (data: ``data dp
batch replica``; fsdp: ``fsdp zero``; tensor: ``tensor model tp mp``); anything else the mesh has no
axis for is dropped, i.e. that dimension is replicated. Pass your own rules (pairs of logical name
and mesh axes, e.g. ``(("embed", "x"), ("mlp", "y"), ...)``) to map onto any other axis names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


# Our mesh roles -> the axis names a user mesh may use for them (see `rules_for_mesh`).
MESH_AXIS_ALIASES: dict[str, tuple[str, ...]] = {
    "data": ("data", "dp", "batch", "replica"),
    "fsdp": ("fsdp", "zero"),
    "tensor": ("tensor", "model", "tp", "mp"),
}


class MeshError(ValueError):
  """A mesh shape that does not fit the available devices."""


def _role_axes(mesh: Mesh) -> dict[str, str]:
  """role -> the mesh's axis for it (only roles the mesh has an axis for)."""
  out = {}
  for role, aliases in MESH_AXIS_ALIASES.items():
    hits = [a for a in mesh.axis_names if a in aliases]
    if len(hits) > 1:
      raise MeshError(f"mesh axes {hits} all look like the {role!r} axis ({aliases}); pass explicit rules")
    if hits:
      out[role] = hits[0]
  return out


def rules_for_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """`rules` (default `RULES`) restated on `mesh`'s own axis names (see the module docstring).

  Each mesh axis a rule names is kept when the mesh has it, else renamed to the mesh's axis of that
  role (``tensor`` -> ``model`` on a ``("data", "model")`` mesh), else dropped (replicated). An axis
  used twice after renaming is kept once. On a ``(data, fsdp, tensor)`` mesh the rules are unchanged.
  """
  rules = RULES if rules is None else rules
  names = set(mesh.axis_names)
  roles = _role_axes(mesh)
  out = []
  for logical, axes in rules:
    if axes is None:
      out.append((logical, None))
      continue
    mapped = []
    for a in ((axes,) if isinstance(axes, str) else tuple(axes)):
      a = a if a in names else roles.get(a)
      if a is not None and a not in mapped:
        mapped.append(a)
    out.append((logical, None if not mapped else mapped[0] if isinstance(axes, str) or len(mapped) == 1
                else tuple(mapped)))
  return tuple(out)


def batch_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """The mesh axes the batch is split over on `mesh` (the ``batch`` rule; ``(data, fsdp)`` by default)."""
  for logical, axes in rules_for_mesh(mesh, rules):
    if logical == "batch":
      return axes
  return None


def resolve_mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1,
                       num_devices: int | None = None) -> tuple[int, int, int]:
  """Sizes for (data, fsdp, tensor); at most one may be -1, meaning "all remaining devices"."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = [data, fsdp, tensor]
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if sizes.count(-1) > 1:
    raise MeshError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise MeshError(f"{n} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}: "
                      f"{n} is not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise MeshError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                    f"devices, but {n} are available")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation) over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  try:
    from jax.experimental import mesh_utils
    dev_array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU / fake devices / unusual topologies
    dev_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from dimensions they do not divide evenly (replicate those dimensions)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    out.append(axes if axes is not None and dim % _mesh_axes_size(mesh, axes) == 0 else None)
  return P(*out)


def logical_to_mesh_spec(logical: P, rules: Sequence[tuple[str, Any]] = RULES) -> P:
  return nn.logical_to_mesh_axes(tuple(logical), rules)


def param_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """NamedShardings for a pytree, from its logical PartitionSpecs and shapes (see `fit_spec`).

  `rules` (default `RULES`) are restated on the mesh's axis names by `rules_for_mesh`.
  """
  rules = rules_for_mesh(mesh, rules)

  def one(logical, leaf):
    spec = logical_to_mesh_spec(logical, rules) if logical is not None else P()
    return NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh))

  return jax.tree.map(one, logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over (data, fsdp) (`batch_axes` on other meshes); the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None):
  """Context in which the model's `nn.with_logical_constraint` calls take effect (rules on the mesh's
  own axis names, `rules_for_mesh`)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_mesh(mesh, rules)):
    yield


def describe_shardings(tree: Any) -> str:
  """One line per leaf: path, shape, PartitionSpec. For logs and the AOT report."""
  lines = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {spec}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Config-driven mesh and rules, multi-host helpers (used by pro_jax.train).


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: data x fsdp (the `batch_axes` of other meshes)."""
  return _mesh_axes_size(mesh, batch_axes(mesh))


def mesh_from_config(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """`make_mesh` from a config section with `data`, `fsdp`, `tensor` (one may be -1)."""
  get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d: getattr(mesh_cfg, k, d)
  return make_mesh(int(get("data", 1)), int(get("fsdp", -1)), int(get("tensor", 1)), devices=devices)


def rules_from_config(rules_cfg: Any) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules from a config value: None / empty = `RULES`, else pairs (name, mesh axes).

  Mesh axes may be None, one axis name or a sequence of names (lists from JSON become tuples).
  """
  if not rules_cfg:
    return RULES
  out = []
  for i, pair in enumerate(rules_cfg):
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f"sharding rule #{i} must be (logical_name, mesh_axes), got {pair!r}")
    name, axes = pair
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [axes] if axes is not None and axes not in MESH_AXES else []
    if bad:
      raise ValueError(f"sharding rule {name!r}: unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def _multihost_env() -> bool:
  """True when the environment describes more than one process (TPU pod slice, SLURM, explicit)."""
  import os
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  import re
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
  if len(hosts) > 1 and all(re.fullmatch(r"[A-Za-z0-9.:_-]+", h.strip()) for h in hosts):
    return True
  try:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1
  except ValueError:
    return False


def initialize_distributed(mode: Any = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Call `jax.distributed.initialize()` for multi-host runs; returns whether it was called.

  mode: "auto" (when the environment describes several processes: a TPU pod slice's
  TPU_WORKER_HOSTNAMES, JAX_COORDINATOR_ADDRESS, SLURM), True / "always", False / "never".
  Must run before anything else touches a JAX backend. A no-op for one process and when already
  initialized.
  """
  if isinstance(mode, str):
    mode = {"auto": "auto", "always": True, "true": True, "never": False, "false": False}.get(mode.lower())
    if mode is None:
      raise ValueError("distributed.initialize must be 'auto', 'always' or 'never'")
  if jax.distributed.is_initialized():
    return False
  if mode is False or (mode == "auto" and not coordinator_address and not _multihost_env()):
    return False
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                  process_id=process_id).items() if v not in (None, "", -1)}
  jax.distributed.initialize(**kwargs)
  return True


def host_batch_rows(global_batch: int, mesh: Mesh) -> slice | np.ndarray:
  """The rows of the global batch that this process feeds (the batch shards its devices hold).

  A slice [start, stop) when they are contiguous (one process: all rows; multi-host meshes whose
  devices are ordered process-major), else the sorted array of row ids. Either indexes a numpy
  batch: `global_batch_array[rows]`.
  """
  sharding = batch_sharding(mesh, 1)
  rows = set()
  for idx in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*idx[0].indices(global_batch)))
  if not rows:
    raise ValueError(f"process {jax.process_index()} holds no rows of a batch of {global_batch}")
  start, stop = min(rows), max(rows) + 1
  if stop - start == len(rows):
    return slice(start, stop)
  return np.asarray(sorted(rows), np.int64)


def host_local_to_global(batch: Any, mesh: Mesh, global_batch: int) -> Any:
  """Global jax.Arrays (leading dim over (data, fsdp)) from this process's rows of a batch pytree.

  `batch` leaves are numpy arrays holding the rows `host_batch_rows(global_batch, mesh)`, in that
  order. Each local device gets its shard of them (no cross-host transfer).
  """
  rows = host_batch_rows(global_batch, mesh)
  row_ids = np.arange(global_batch)[rows]
  position = {int(r): i for i, r in enumerate(row_ids)}

  def one(x):
    x = np.asarray(x)
    if x.shape[0] != len(row_ids):
      raise ValueError(f"this process feeds {len(row_ids)} rows of the global batch of {global_batch}, "
                       f"got a leaf with leading dimension {x.shape[0]}")
    sharding = batch_sharding(mesh, x.ndim)
    shape = (global_batch,) + x.shape[1:]
    if isinstance(rows, slice):
      return jax.make_array_from_process_local_data(sharding, x, shape)
    arrays = []
    for device, idx in sharding.addressable_devices_indices_map(shape).items():
      local = [position[r] for r in range(*idx[0].indices(global_batch))]
      arrays.append(jax.device_put(x[local], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

  return jax.tree.map(one, batch)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """A `batch_sharding` per leaf of a batch pytree (arrays or ShapeDtypeStructs), by rank."""
  return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape)), batch)
