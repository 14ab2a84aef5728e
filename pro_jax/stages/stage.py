"""Plumbing shared by the PRO stages: a stage = a model, a loss, a batch spec, frozen inputs -> a
`pro_jax.train.trainer.Task` run by the engine's one train step.

Every stage has ONE task builder (`policy.sft_task`, `rm.rm_task`, `adapter.adapter_task`,
`policy.policy_task`, `ppo.ppo_task`) that calls `make_task`. The pipeline calls it with
`StageInputs` (backbone weights, frozen variables, the input pipeline); `pro-jax aot`
(`pro_jax.stages.tasks`) calls the same builder with `inputs=None`, abstract shapes only, as
MaxText's train_compile does with its real train step.

    task = make_task("policy", loss_fn, abstract, axes, spec, init=lambda rng: init_variables(model, rng),
                     frozen={"ref": (ref_model, "bfloat16")}, model_config=model.config, tokens_per_step=B * L,
                     flops_per_step=flops, inputs=StageInputs(init=backbone.params, frozen={"ref": ref_vars},
                                                              data=pipeline, extra={...}))
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.configs.base import base_config
from pro_jax.data.pipeline import Pipeline
from pro_jax.models import ModelConfig, Transformer, abstract_variables, logical_axes
from pro_jax.models.sources import graft
from pro_jax.train.trainer import Task


@dataclasses.dataclass
class StageInputs:
  """What a stage trains from (the pipeline's side of a task builder; None in `pro-jax aot`).

  init: pretrained "params" grafted into the trained model's fresh variables (`graft`), or None;
  frozen: name -> variables of a frozen input (reference policy, feature backbone);
  data: the input pipeline (its `batch_spec()` is the task's); extra: metadata saved with checkpoints.
  """

  init: Any = None
  frozen: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  data: Pipeline | None = None
  extra: dict | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the trained variables differ from `Transformer.apply`'s: `to_model(trained)` and back."""

  to_model: Callable[[Any], Any] = lambda v: v
  to_trained: Callable[[Any], Any] = lambda v: v


def _place(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def _abstract_params(model: Transformer, dtype: str) -> dict:
  """Abstract {"params": ...} of a frozen model whose weights are loaded in `dtype`."""
  return {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                                 abstract_variables(model)["params"])}


def _frozen_inputs(frozen: Mapping[str, tuple[Transformer, str]], values: Mapping[str, Any] | None
                   ) -> tuple[dict, dict, dict]:
  """(abstract, logical axes, variables) of the frozen inputs: each model's "params" only (a
  backbone's lm_head is dropped under head="none"); abstract from the variables when given."""
  abstract, axes, variables = {}, {}, {}
  for key, (model, dtype) in frozen.items():
    model_axes = {"params": logical_axes(model)["params"]}
    axes[key] = model_axes
    if values is None:
      abstract[key] = _abstract_params(model, dtype)
      continue
    params = values[key]["params"]
    variables[key] = {"params": {k: params[k] for k in model_axes["params"]}}
    abstract[key] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), variables[key])
  return abstract, axes, variables


def make_task(name: str, loss_fn: Callable, abstract: Any, axes: Any, spec: dict, *,
              init: Callable[[jax.Array], Any] | None, layout: Layout = Layout(),
              frozen: Mapping[str, tuple[Transformer, str]] | None = None,
              model_config: ModelConfig | None = None, tokens_per_step: int = 0,
              flops_per_step: float | None = None, inputs: StageInputs | None = None) -> Task:
  """The engine Task of a stage (see the module docstring).

  abstract / axes: the trained variables (in the trained layout) and their logical axes;
  init: rng -> fresh trained-layout variables (compiled with their shardings; the backbone is then
    grafted into them one array at a time, never baked into the compiled init);
  frozen: name -> (Transformer, param dtype of its loaded weights): inputs without gradients.
  """
  frozen = dict(frozen or {})
  frozen_abstract, frozen_axes, frozen_vars = _frozen_inputs(frozen, None if inputs is None else inputs.frozen)

  if inputs is None:
    def init_variables(*args, **kwargs):
      raise RuntimeError(f"the AOT task of stage {name!r} has abstract shapes only; train with the pipeline")
    make_data, init_frozen, extra = None, None, None
  else:
    def init_variables(rng: jax.Array, *, shardings: Any) -> Any:
      variables = jax.jit(init, out_shardings=shardings)(rng)
      if inputs.init is None:
        return variables
      return layout.to_trained(graft(layout.to_model(variables), inputs.init))

    pipeline = inputs.data
    make_data = lambda rows: pipeline.with_rows(rows).iterator()
    init_frozen = (lambda shardings: {k: _place(frozen_vars[k], shardings[k]) for k in frozen_vars}) \
        if frozen_vars else None
    extra = inputs.extra
  return Task(loss_fn=loss_fn, abstract_variables=abstract, logical_axes=axes, init_variables=init_variables,
              batch_spec=spec, make_data=make_data, frozen_abstract=frozen_abstract, frozen_logical_axes=frozen_axes,
              init_frozen=init_frozen, model_config=model_config, tokens_per_step=tokens_per_step,
              flops_per_step=flops_per_step, extra=extra, name=name)


def trained_passes(mcfg: ModelConfig, trainable: str) -> float:
  """Model FLOPs of a trained token in forwards: 3 (forward + backward, PaLM), 2 for a LoRA-trained
  model (forward + activation gradients; no weight gradients of the frozen base)."""
  return 2.0 if trainable == "lora" and mcfg.lora is not None else 3.0


def stage_engine_config(stage_cfg: Any, seed: int, mcfg: ModelConfig | None) -> Any:
  """A stage's engine config: a copy of its section with the pipeline's seed, its model section
  showing `mcfg` (the transformer the stage really trains; None leaves the section as written)."""
  c = copy.deepcopy(stage_cfg)
  c.seed = int(seed)
  if mcfg is not None:
    for k, v in mcfg.to_dict().items():
      if k in c.model and k not in ("lora", "rope_scaling"):
        c.model[k] = v
  return c


def engine_config(base: Any = None, **updates) -> Any:
  """A copy of the engine's base config (or `base`) with dotted-key updates."""
  cfg = copy.deepcopy(base) if base is not None else base_config()
  for dotted, value in updates.items():
    node = cfg
    *path, last = dotted.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


__all__ = ["StageInputs", "Layout", "make_task", "trained_passes", "stage_engine_config", "engine_config"]
