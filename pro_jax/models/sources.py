"""Where a stage's model comes from, and grafting a pretrained backbone under new heads.

A model source is a string ``KIND`` or ``KIND:PATH``, one entry per kind in `SOURCES`:

* ``"scratch"``: random init from the stage's `model` config section;
* ``"checkpoint:DIR"``: a pro-jax training run (`pro_jax.load_checkpoint`), e.g. the SFT policy;
* ``"hf:DIR"``: a Hugging Face directory (`pro_jax.load_hf_model`);
* ``"llama2c:FILE"``: a llama2.c checkpoint (`pro_jax.load_llama2c`).

A new kind is one `register_source(kind, loader, usage)` call: `loader(path, dtype=, param_dtype=)`
returns a `Backbone`. `load_source` returns the backbone's `ModelConfig` and "params"; `graft`
copies every parameter the backbone has (embeddings, layers, final norm, the LM head when both
have one) into a model's fresh variables, which may have other heads (a score head with K labels,
a value head) and LoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.models.config import ModelConfig
from pro_jax.models.heads import head_to_params
from pro_jax.models.hf_io import load_hf_model
from pro_jax.models.llama2c import load_llama2c
from pro_jax.models.lora import merge_lora
from pro_jax.train.checkpoint import load_checkpoint


@dataclasses.dataclass
class Backbone:
  config: ModelConfig | None  # None for "scratch"
  params: Any  # the "params" collection (None for "scratch")
  source: str
  tokenizer: Any = None  # llama2.c sources carry their tokenizer


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One kind of model source: `load(path, *, dtype, param_dtype) -> Backbone`; `usage` for errors."""

  load: Callable[..., Backbone]
  usage: str
  takes_path: bool = True


def _scratch(path: str, *, dtype: str, param_dtype: str) -> Backbone:
  del path, dtype, param_dtype
  return Backbone(None, None, "scratch")


def _checkpoint(path: str, *, dtype: str, param_dtype: str) -> Backbone:
  del dtype, param_dtype  # a pro-jax run keeps its own dtypes
  ck = load_checkpoint(path)
  if ck.model_config is None:
    raise ValueError(f"{path}: the checkpoint holds no transformer (model_config missing)")
  variables = head_to_params(ck.variables, "score")  # a LoRA-trained RM keeps its score head in "lora"
  params, cfg = variables["params"], ck.model_config
  if "lora" in variables and cfg.lora is not None:  # a LoRA run: its policy is base + merged LoRA
    params = merge_lora(cfg, params, variables["lora"])
    cfg = cfg.replace(lora=None)
  return Backbone(cfg, params, f"checkpoint:{path}")


def _hf(path: str, *, dtype: str, param_dtype: str) -> Backbone:
  model, params = load_hf_model(path, dtype=dtype, param_dtype=param_dtype)
  return Backbone(model.config, params, f"hf:{path}")


def _llama2c(path: str, *, dtype: str, param_dtype: str) -> Backbone:
  model, params, tok = load_llama2c(path, dtype=dtype, param_dtype=param_dtype)
  return Backbone(model.config, params, f"llama2c:{path}", tokenizer=tok)


SOURCES: dict[str, SourceKind] = {
    "scratch": SourceKind(_scratch, "'scratch'", takes_path=False),
    "checkpoint": SourceKind(_checkpoint, "'checkpoint:DIR'"),
    "hf": SourceKind(_hf, "'hf:DIR'"),
    "llama2c": SourceKind(_llama2c, "'llama2c:FILE'"),
}


def register_source(kind: str, load: Callable[..., Backbone], usage: str, *, takes_path: bool = True) -> None:
  """Add a model source kind (e.g. ``register_source("gguf", load_gguf_backbone, "'gguf:FILE'")``)."""
  SOURCES[kind] = SourceKind(load, usage, takes_path)


def parse_source(source: str) -> tuple[str, str]:
  kind, _, path = str(source).partition(":")
  entry = SOURCES.get(kind)
  if entry is None or bool(path) != entry.takes_path:
    kinds = ", ".join(e.usage for e in SOURCES.values())
    raise ValueError(f"model source {source!r}: expected one of {kinds}")
  return kind, path


def load_source(source: str, *, dtype: str = "float32", param_dtype: str = "float32") -> Backbone:
  kind, path = parse_source(source)
  backbone = SOURCES[kind].load(path, dtype=dtype, param_dtype=param_dtype)
  return dataclasses.replace(backbone, source=str(source))


def derive_config(backbone: Backbone, fallback: ModelConfig, **changes) -> ModelConfig:
  """The stage's model config: the backbone's architecture with the stage's heads / dtypes / LoRA."""
  base = backbone.config if backbone.config is not None else fallback
  return base.replace(**changes)


def graft(variables: Any, backbone_params: Any | None) -> Any:
  """`variables` with every backbone "params" subtree of the same name copied in.

  Each copied leaf takes the dtype and the placement (sharding) of the leaf it replaces, one array at
  a time (never as constants of a compiled function: gigabytes of HLO at 7B); it is always a fresh
  buffer (`may_alias=False`: the engine's state init donates the trained variables while a frozen
  reference built from the same backbone may still hold the backbone's arrays). Subtrees the model
  lacks (a causal LM's lm_head under a score-head model) are skipped; a subtree of another shape is
  an error.
  """
  if backbone_params is None:
    return variables
  params = dict(variables["params"])
  for name, value in backbone_params.items():
    if name not in params:
      continue
    mine = params[name]
    if jax.tree.structure(mine) != jax.tree.structure(value) or any(
        a.shape != np.shape(b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(value))):
      raise ValueError(f"backbone parameter {name!r} does not fit the stage's model (different shapes)")
    params[name] = jax.tree.map(
        lambda a, b: jax.device_put(jnp.asarray(b, a.dtype), a.sharding, may_alias=False), mine, value)
  return {**variables, "params": params}


__all__ = ["Backbone", "SOURCES", "register_source", "parse_source", "load_source", "derive_config", "graft"]
