"""pro-jax: prompt-aware multi-objective alignment (PRO) in JAX.

The public API is re-exported here and imported lazily, so ``import pro_jax`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "ModelConfig": "pro_jax.models.config",
    "LoRAConfig": "pro_jax.models.config",
    "RopeScaling": "pro_jax.models.config",
    "Transformer": "pro_jax.models.transformer",
    "ModelOutput": "pro_jax.models.transformer",
    "init_variables": "pro_jax.models.transformer",
    "init_cache": "pro_jax.models.transformer",
    "logical_axes": "pro_jax.models.transformer",
    "make_mesh": "pro_jax.sharding",
}


def __getattr__(name: str):
  module = _API.get(name)
  if module is None:
    raise AttributeError(f"module 'pro_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + list(_API))


__all__ = sorted(_API)
