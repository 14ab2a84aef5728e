"""Where a new head lives while it trains under LoRA.

The engine trains whole variable collections (`trainable="lora"` trains the ``"lora"`` collection
only). A head that is new to the model (the reward model's ``score``, the PPO policy's
``value_head``) must train with the adapters (PEFT's ``modules_to_save``), so during training it
rides in ``variables["lora"][name]``; `head_to_params` puts it back into ``"params"`` before
`Transformer.apply`. Both functions return new dicts and never copy arrays.
"""

from __future__ import annotations

from typing import Any


def head_to_lora(variables: Any, name: str) -> Any:
  """``params[name]`` moved into ``lora[name]``; variables without a "lora" collection as they are."""
  if "lora" not in variables:
    return variables
  params = dict(variables["params"])
  head = params.pop(name)
  return {**variables, "params": params, "lora": {**variables["lora"], name: head}}


def head_to_params(variables: Any, name: str) -> Any:
  """The inverse of `head_to_lora`: ``lora[name]`` moved back into ``params`` (if it is there)."""
  lora = variables.get("lora") if hasattr(variables, "get") else None
  if not lora or name not in lora:
    return variables
  lora = dict(lora)
  head = lora.pop(name)
  return {**variables, "params": {**variables["params"], name: head}, "lora": lora}


__all__ = ["head_to_lora", "head_to_params"]
