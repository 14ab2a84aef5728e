"""LoRA helpers: initialize the adapters, train only them, merge them into the weights for export.

A model whose ``config.lora`` is set (a `LoRAConfig`: rank r, alpha, dropout, target projections)
adds to every targeted projection ``y = x @ W (+ bias)`` the low-rank term
``dropout(x) @ a @ b * alpha / r`` with ``a: [in, r]``, ``b: [r, out]`` (stacked layers:
``[n_layers, in, r]`` and ``[n_layers, r, out]``). PEFT's initialization: ``a`` uniform in
``+-1/sqrt(in)``, ``b = 0``, so a fresh adapter leaves the model's outputs unchanged. The adapters
live in their own variable collection, mirroring the parameter paths:

    variables = {"params": params, "lora": {"layers": {"attn": {"q_proj": {"a": ..., "b": ...}}}}}

Targets: Llama ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``; GPT-2 ``c_attn c_proj
c_fc`` (``c_proj`` names both the attention output and the MLP output projection, so it targets both).
Dropout on the LoRA input is active only with ``Transformer(config, deterministic=False)`` and a
``"dropout"`` rng in ``apply(..., rngs={"dropout": key})``.

Training only LoRA: ``lora_only(optax.adamw(...))`` (an `optax.multi_transform` that zeroes the
updates of ``params`` and keeps optimizer state only for the adapters), or build your own from
`lora_trainable_mask`. Note that ``optax.masked(tx, mask)`` alone passes the *raw gradients* of the
masked-out leaves through, so it does not freeze them; chain it with
``optax.masked(optax.set_to_zero(), inverted_mask)`` or use `lora_only`.

Export: ``merge_lora(config, params, lora)`` returns plain params with ``W + a @ b * alpha / r``
folded in, for ``Transformer(merged_config(config))``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from pro_jax.models.config import ModelConfig
from pro_jax.models.transformer import Transformer, abstract_variables, init_variables


def _require_lora(config: ModelConfig) -> None:
  if config.lora is None:
    raise ValueError("the model config has no LoRA adapters (config.lora is None)")


def init_lora(model: Transformer, rng: jax.Array) -> dict:
  """Fresh LoRA variables (the "lora" collection only: a random, b = 0).

  The base parameters are not materialized (their initialization is dead code under jit).
  """
  _require_lora(model.config)
  return jax.jit(lambda r: init_variables(model, r)["lora"])(rng)


def merged_config(config: ModelConfig) -> ModelConfig:
  """The config of the model that runs merged params (the same, without adapters)."""
  return config.replace(lora=None)


def _lora_modules(lora: Any, path: tuple[str, ...] = ()):
  """Yield (path, {"a", "b"}) for every adapted projection in a lora tree."""
  if isinstance(lora, dict) or hasattr(lora, "keys"):
    if "a" in lora and "b" in lora:
      yield path, lora
      return
    for k in lora:
      yield from _lora_modules(lora[k], path + (k,))


def lora_delta(config: ModelConfig, a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b * alpha / rank`` in float32 (batched over a leading layers axis when present)."""
  _require_lora(config)
  return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * config.lora.scale


def merge_lora(config: ModelConfig, params: dict, lora: dict) -> dict:
  """Params with every adapter folded in: ``kernel + a @ b * alpha / rank`` (in the kernel's dtype).

  Works on stacked layers (``[n_layers, in, out]``) and under jit / on sharded arrays. The result
  runs on ``Transformer(merged_config(config))`` and is what HF export should save.
  """
  _require_lora(config)
  merged = dict(params)  # containers along the adapted paths are copied below; leaves are shared
  count = 0
  for path, ab in _lora_modules(lora):
    node = merged
    for k in path[:-1]:
      if k not in node:
        raise ValueError(f"merge_lora: adapter {'/'.join(path)} has no matching module in params")
      node[k] = dict(node[k])
      node = node[k]
    if path[-1] not in node or "kernel" not in node[path[-1]]:
      raise ValueError(f"merge_lora: adapter {'/'.join(path)} has no matching kernel in params")
    module = dict(node[path[-1]])
    kernel = module["kernel"]
    delta = lora_delta(config, ab["a"], ab["b"])
    if delta.shape != kernel.shape:
      raise ValueError(f"merge_lora: adapter {'/'.join(path)} gives shape {delta.shape}, kernel is "
                       f"{kernel.shape}")
    module["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    node[path[-1]] = module
    count += 1
  if count == 0:
    raise ValueError("merge_lora: the lora tree holds no adapters")
  return merged


def lora_param_count(config: ModelConfig) -> int:
  """Number of LoRA parameters (all layers), from the variable shapes (nothing is allocated)."""
  _require_lora(config)
  lora = abstract_variables(Transformer(config))["lora"]
  return int(sum(x.size for x in jax.tree.leaves(lora)))


def split_variables(variables: dict) -> tuple[dict, dict]:
  """``{"params": p, "lora": l}`` -> ``(p, l)`` (``l`` is ``{}`` when there are no adapters)."""
  return variables["params"], variables.get("lora", {})


def combine_variables(params: dict, lora: dict | None = None) -> dict:
  """``(p, l)`` -> the variables dict `Transformer.apply` takes."""
  return {"params": params, "lora": lora} if lora else {"params": params}


def lora_trainable_mask(variables: dict) -> dict:
  """Pytree of bools over ``variables``: True for "lora" leaves, False for "params" (and others)."""
  return {k: jax.tree.map(lambda _: k == "lora", v) for k, v in variables.items()}


def lora_labels(variables: dict) -> dict:
  """Pytree of labels over ``variables``: "lora" for adapter leaves, "frozen" for the rest."""
  return {k: jax.tree.map(lambda _: "lora" if k == "lora" else "frozen", v) for k, v in variables.items()}


def lora_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """An optimizer over the whole variables dict that trains only the adapters.

  ``tx`` runs on the "lora" leaves; the "params" leaves get zero updates and no optimizer state.
  """
  return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, lora_labels)
