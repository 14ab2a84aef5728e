"""Where a stage's model comes from, and grafting a pretrained backbone under new heads.

A model source is a string:

* ``"scratch"``: random init from the stage's `model` config section;
* ``"checkpoint:DIR"``: a pro-jax training run (`pro_jax.load_checkpoint`), e.g. the SFT policy;
* ``"hf:DIR"``: a Hugging Face directory (`pro_jax.load_hf_model`);
* ``"llama2c:FILE"``: a llama2.c checkpoint (`pro_jax.load_llama2c`).

`load_source` returns the backbone's `ModelConfig` and "params"; `graft` initializes a model with
possibly different heads (score head with K labels, value head, LoRA) and copies every parameter
the backbone has into it (embeddings, layers, final norm, and the LM head when both have one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pro_jax.models import ModelConfig, Transformer, init_variables

SOURCE_KINDS = ("scratch", "checkpoint", "hf", "llama2c")


@dataclasses.dataclass
class Backbone:
  config: ModelConfig | None  # None for "scratch"
  params: Any  # the "params" collection (None for "scratch")
  source: str
  tokenizer: Any = None  # llama2.c sources carry their tokenizer


def parse_source(source: str) -> tuple[str, str]:
  kind, _, path = str(source).partition(":")
  if kind not in SOURCE_KINDS or (kind != "scratch" and not path) or (kind == "scratch" and path):
    raise ValueError(f"model source {source!r}: expected 'scratch', 'checkpoint:DIR', 'hf:DIR' or "
                     "'llama2c:FILE'")
  return kind, path


def load_source(source: str, *, dtype: str = "float32", param_dtype: str = "float32") -> Backbone:
  kind, path = parse_source(source)
  if kind == "scratch":
    return Backbone(None, None, source)
  if kind == "checkpoint":
    from pro_jax.train.checkpoint import load_checkpoint
    ck = load_checkpoint(path)
    if ck.model_config is None:
      raise ValueError(f"{path}: the checkpoint holds no transformer (model_config missing)")
    from pro_jax.stages.rm import rm_variables
    variables = rm_variables(ck.variables)  # a LoRA-trained RM keeps its score head in "lora" while training
    params = variables["params"]
    cfg = ck.model_config
    if "lora" in variables and cfg.lora is not None:  # a LoRA run: its policy is base + merged LoRA
      from pro_jax.models.lora import merge_lora
      params = merge_lora(cfg, params, variables["lora"])
      cfg = cfg.replace(lora=None)
    return Backbone(cfg, params, source)
  if kind == "hf":
    from pro_jax.models.hf_io import load_hf_model
    model, params = load_hf_model(path, dtype=dtype, param_dtype=param_dtype)
    return Backbone(model.config, params, source)
  from pro_jax.models.llama2c import load_llama2c
  model, params, tok = load_llama2c(path, dtype=dtype, param_dtype=param_dtype)
  return Backbone(model.config, params, source, tokenizer=tok)


def derive_config(backbone: Backbone, fallback: ModelConfig, **changes) -> ModelConfig:
  """The stage's model config: the backbone's architecture with the stage's heads / dtypes / LoRA."""
  base = backbone.config if backbone.config is not None else fallback
  return base.replace(**changes)


def graft(model: Transformer, backbone_params: Any | None, rng: jax.Array) -> dict:
  """Variables of `model`: fresh init, then every backbone parameter with a matching path and shape."""
  variables = init_variables(model, rng)
  if backbone_params is None:
    return variables
  params = dict(variables["params"])
  for name, value in backbone_params.items():
    if name not in params:
      continue  # e.g. the backbone's lm_head under a score-head model
    mine = params[name]
    shapes_match = jax.tree.structure(mine) == jax.tree.structure(value) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(value)))
    if not shapes_match:
      raise ValueError(f"backbone parameter {name!r} does not fit the stage's model (different shapes)")
    params[name] = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), mine, value)
  variables["params"] = params
  return variables
