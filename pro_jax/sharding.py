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


class MeshError(ValueError):
  """A mesh shape that does not fit the available devices."""


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
                    rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """NamedShardings for a pytree, from its logical PartitionSpecs and shapes (see `fit_spec`)."""

  def one(logical, leaf):
    spec = logical_to_mesh_spec(logical, rules) if logical is not None else P()
    return NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh))

  return jax.tree.map(one, logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES):
  """Context in which the model's `nn.with_logical_constraint` calls take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def describe_shardings(tree: Any) -> str:
  """One line per leaf: path, shape, PartitionSpec. For logs and the AOT report."""
  lines = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {spec}")
  return "\n".join(lines)
