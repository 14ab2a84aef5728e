"""Plumbing shared by the PRO stages: a stage = a model, a loss, a pipeline, frozen inputs -> a
`pro_jax.train.trainer.Task` run by the engine's one train step.

    task = make_task(model, loss_fn, pipeline, init=lambda rng: init_variables(model, rng),
                     backbone_params=backbone.params,
                     frozen={"ref": (ref_model, ref_variables)}, name="policy")
    result = train(cfg, workdir, task)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.data.pipeline import Pipeline
from pro_jax.models import Transformer, abstract_variables, logical_axes
from pro_jax.train.trainer import Task


def _place(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def _init_with_backbone(init: Callable[[jax.Array], Any], backbone_params: Any) -> Callable[..., Any]:
  """`init(rng, shardings=...)`: the random init compiled with its output shardings, then every
  backbone parameter placed onto the sharding of the leaf it replaces, one array at a time.

  The backbone weights stay arguments of nothing compiled (baking them into the jitted init would
  embed them as constants: fine for a toy model, gigabytes of HLO at 7B)."""

  def run(rng: jax.Array, *, shardings: Any) -> Any:
    variables = dict(jax.jit(init, out_shardings=shardings)(rng))
    if backbone_params is None:
      return variables
    params = dict(variables["params"])
    for name, value in backbone_params.items():
      if name not in params:
        continue  # e.g. a causal LM's lm_head under a score-head model
      mine = params[name]
      if jax.tree.structure(mine) != jax.tree.structure(value) or any(
          a.shape != np.shape(b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(value))):
        raise ValueError(f"backbone parameter {name!r} does not fit the stage's model (different shapes)")
      # may_alias=False: always a fresh buffer. On a one-device mesh the placement would otherwise hand
      # back the backbone's own arrays, which the engine's state init then donates (deletes) while a
      # frozen reference built from the same backbone still holds them.
      params[name] = jax.tree.map(
          lambda a, b: jax.device_put(jnp.asarray(b, a.dtype), a.sharding, may_alias=False), mine, value)
    variables["params"] = params
    return variables

  return run


def make_task(model: Transformer | None, loss_fn: Callable, pipeline: Pipeline, *,
              init: Callable[[jax.Array], Any], backbone_params: Any = None, abstract: Any = None,
              axes: Any = None,
              frozen: Mapping[str, tuple[Any, Any]] | None = None, name: str = "train",
              tokens_per_example: int | None = None, forward_passes: float = 3.0,
              extra: dict | None = None, model_config: Any = None) -> Task:
  """A Task for the engine.

  model: the trained Transformer (None for a non-transformer model such as the adapter MLP, then
    `abstract` and `axes` are required).
  init: rng -> the trained model's fresh variables (jitted with the shardings);
  backbone_params: pretrained "params" subtrees copied over the fresh ones (see `_init_with_backbone`).
  frozen: name -> (Transformer or None, variables, [logical axes]); variables without gradients.
  forward_passes: model FLOPs per token in units of one forward (3 = train; DPO with a reference
    counts its frozen forward separately through `frozen`).
  """
  abstract = abstract if abstract is not None else abstract_variables(model)
  axes = axes if axes is not None else logical_axes(model)
  frozen = dict(frozen or {})
  frozen_abstract, frozen_axes, frozen_vars = {}, {}, {}
  for key, item in frozen.items():
    fmodel, fvars = item[0], item[1]
    fax = item[2] if len(item) > 2 else None
    if fax is None:
      if fmodel is None:
        raise ValueError(f"frozen input {key!r}: give a model or logical axes")
      full_axes = logical_axes(fmodel)
      # keep only what the frozen model uses (e.g. drop a backbone's lm_head under head="none")
      fvars = {c: {k: v for k, v in fvars[c].items() if k in full_axes[c]} for c in fvars if c in full_axes}
      fax = {c: {k: full_axes[c][k] for k in fvars[c]} for c in fvars}
    frozen_vars[key] = fvars
    frozen_abstract[key] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), fvars)
    frozen_axes[key] = fax
  spec = pipeline.batch_spec()
  B = pipeline.config.batch_size
  L = max((v.shape[1] for k, v in spec.items() if k.endswith("tokens") and v.ndim == 2), default=0)
  sides = 2 if "chosen_tokens" in spec else 1
  tokens = tokens_per_example or sides * L
  mcfg = model_config if model_config is not None else (model.config if model is not None else None)
  flops = None
  if mcfg is not None and L:
    fwd = mcfg.flops_per_token(L)
    flops = forward_passes * fwd * B * tokens
    for key, item in frozen.items():
      if item[0] is not None and key != "base":
        flops += item[0].config.flops_per_token(L) * B * tokens
  return Task(
      loss_fn=loss_fn, abstract_variables=abstract, logical_axes=axes,
      init_variables=_init_with_backbone(init, backbone_params),
      batch_spec=spec, make_data=lambda rows: pipeline.with_rows(rows).iterator(),
      frozen_abstract=frozen_abstract, frozen_logical_axes=frozen_axes,
      init_frozen=(lambda shardings: {k: _place(frozen_vars[k], shardings[k]) for k in frozen_vars}) if frozen else None,
      model_config=mcfg, tokens_per_step=B * tokens, flops_per_step=flops, extra=extra, name=name)


def batched_apply(fn: Callable[..., Any], arrays: Mapping[str, np.ndarray], batch_size: int) -> Any:
  """Run a jitted `fn(**batch)` over the leading axis in fixed-size chunks (last one padded).

  Returns the concatenated numpy outputs (a pytree), trimmed to the input length.
  """
  n = len(next(iter(arrays.values())))
  outs = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    chunk = {}
    for k, v in arrays.items():
      x = v[start:stop]
      if stop - start < batch_size:
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - (stop - start), 0)])
      chunk[k] = x
    out = jax.device_get(fn(**chunk))
    outs.append(jax.tree.map(lambda y: np.asarray(y)[:stop - start], out))
  return jax.tree.map(lambda *ys: np.concatenate(ys, 0), *outs)


def engine_config(base: Any = None, **updates) -> Any:
  """A copy of the engine's base config (or `base`) with dotted-key updates."""
  from pro_jax.configs.base import base_config
  import copy
  cfg = copy.deepcopy(base) if base is not None else base_config()
  for dotted, value in updates.items():
    node = cfg
    *path, last = dotted.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


__all__ = ["make_task", "batched_apply", "engine_config"]
