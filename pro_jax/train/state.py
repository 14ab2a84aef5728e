"""The train state, the trainable / non-trainable split of the model variables, and their shardings.

The model's variables (`{"params": ..., "lora": ...}`, or an adapter's `{"adapter": ...}`) are SPLIT
by collection into

* the trainable tree: lives in `TrainState.params`, is differentiated and updated by the optimizer;
* the rest: passed to the step as `frozen["base"]` (no gradient is ever computed for it) and merged
  back before the loss function sees the variables.

So LoRA training takes no weight-gradient of the base model at all (the backward pass still
propagates activations through the base weights), instead of computing and masking them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# trainable mode -> the variable collections it trains (None: all of them)
TRAINABLE: dict[str, tuple[str, ...] | None] = {"full": None, "lora": ("lora",), "adapter": ("adapter",)}


@flax.struct.dataclass
class TrainState:
  """Everything a step updates. Checkpointed as two items: `params` and the rest."""

  step: jax.Array  # int32 []: batches consumed (applied + skipped updates)
  params: Any  # the trainable variables (a dict of collections)
  opt_state: Any
  rng: jax.Array  # uint32 [2] (raw PRNGKey), split once per step inside the step
  nonfinite_count: jax.Array  # int32 []: updates skipped because the loss or a gradient was non-finite


def trainable_collections(variables: Mapping[str, Any], trainable: str | Sequence[str]) -> tuple[str, ...]:
  """The collections of `variables` that `trainable` selects ("full", "lora", "adapter" or names)."""
  if isinstance(trainable, str):
    if trainable not in TRAINABLE:
      raise ValueError(f"trainable must be one of {sorted(TRAINABLE)}, got {trainable!r}")
    names = TRAINABLE[trainable]
  else:
    names = tuple(trainable)
  if names is None:
    return tuple(variables)
  missing = [n for n in names if n not in variables]
  if missing:
    raise ValueError(f"trainable={trainable!r} needs variable collection(s) {missing}, but the model has "
                     f"only {sorted(variables)} (LoRA training needs model.lora.rank > 0)")
  return tuple(names)


def split_variables(variables: Mapping[str, Any], trainable: str | Sequence[str]) -> tuple[dict, dict]:
  """(trainable, rest): two dicts of collections; `merge_variables(trainable, rest)` undoes it."""
  names = trainable_collections(variables, trainable)
  return ({k: v for k, v in variables.items() if k in names},
          {k: v for k, v in variables.items() if k not in names})


def merge_variables(trainable: Mapping[str, Any], rest: Mapping[str, Any] | None) -> dict:
  out = dict(rest or {})
  out.update(trainable)
  return out


def init_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state (run it under jit with `out_shardings` to create it sharded)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jnp.asarray(rng, jnp.uint32), nonfinite_count=jnp.zeros((), jnp.int32))


def state_shardings(params_shardings: Any, abstract_params: Any, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
  """A TrainState of NamedShardings: optimizer moments like their parameters, scalars replicated."""
  rep = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, params_shardings,
                                 transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=params_shardings, opt_state=opt_sh, rng=rep, nonfinite_count=rep)


def abstract_state(abstract_params: Any, optimizer: optax.GradientTransformation,
                   shardings: TrainState | None = None) -> TrainState:
  """ShapeDtypeStructs of a TrainState (with `.sharding` when `shardings` is given)."""
  abstract = jax.eval_shape(lambda p: init_state(p, optimizer, jnp.zeros((2,), jnp.uint32)), abstract_params)
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (a matching tree of NamedShardings)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
