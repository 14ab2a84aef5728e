"""Lazy public names for a package: `from pro_jax import X` imports X's module on first use only
(so `import pro_jax` stays cheap and pulls in neither Orbax nor grain until they are needed)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_api(package: str, namespace: dict, api: Mapping[str, str]) -> tuple[Callable[[str], Any],
                                                                           Callable[[], list[str]]]:
  """(`__getattr__`, `__dir__`) for a package whose public names map to the modules defining them."""

  def __getattr__(name: str) -> Any:
    module = api.get(name)
    if module is None:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    namespace[name] = value
    return value

  def __dir__() -> list[str]:
    return sorted(list(namespace) + list(api))

  return __getattr__, __dir__
