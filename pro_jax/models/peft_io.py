"""LoRA adapters in PEFT's format: `save_peft_adapter` (export) and `load_peft_adapter` (import).

A PEFT LoRA adapter directory holds ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``, ``task_type``, ``fan_in_fan_out``, ...) and
``adapter_model.safetensors`` with one pair of tensors per adapted module:

    base_model.model.<transformers module name>.lora_A.weight   [r, in]
    base_model.model.<transformers module name>.lora_B.weight   [out, r]

(e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; GPT-2's Conv1D modules
``transformer.h.0.attn.c_attn`` with ``fan_in_fan_out: true``). PEFT adds ``B @ A * lora_alpha / r``
to the module's weight ([out, in], transposed for Conv1D), which is pro_jax's ``a @ b * alpha / r``
on the kernel [in, out] with ``a = lora_A.T`` ([in, r]) and ``b = lora_B.T`` ([r, out]). Our target
names are transformers' module names, so ``target_modules`` is `LoRAConfig.targets` as it is.

`peft` itself is not needed (nor torch): the files are written and read with safetensors. The format
was checked against adapters written by peft 0.22 (tests/golden/make_peft_golden.py).
Not supported (a `CheckpointError` names the field): DoRA, rsLoRA, per-module rank / alpha patterns,
``layers_to_transform``, ``modules_to_save``, LoRA biases, regex ``target_modules``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from pro_jax.data.files import staged_directory
from pro_jax.models.config import GPT2_LORA_TARGETS, LLAMA_LORA_TARGETS, LoRAConfig, ModelConfig
from pro_jax.models.hf_config import CheckpointError, read_json_object
from pro_jax.models.hf_io import _BODY_PREFIX, _hf_names, _to_host
from pro_jax.models.hub import resolve_pretrained
from pro_jax.models.safetensors_io import DTYPE_CODES, write_safetensors
from pro_jax.models.transformer import Transformer, abstract_variables

PathLike = str | os.PathLike

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors")


def _module_names(config: ModelConfig) -> dict[tuple[str, ...], str]:
  """Our LoRA module path (``("layers", "attn", "q_proj")``) -> transformers module name template
  with ``{i}`` for the layer (``model.layers.{i}.self_attn.q_proj``)."""
  prefix = _BODY_PREFIX["gpt2" if config.arch == "gpt2" else "llama"]
  out = {}
  for path, name, _ in _hf_names(config.replace(lora=None), prefix):
    if path[-1] == "kernel" and path[-2] in (GPT2_LORA_TARGETS if config.arch == "gpt2" else LLAMA_LORA_TARGETS):
      out[path[:-1]] = name.removesuffix(".weight")
  return out


def peft_config_dict(config: ModelConfig, base_model_name_or_path: str, task_type: str = "CAUSAL_LM",
                     revision: str | None = None) -> dict:
  """The adapter_config.json PEFT's `LoraConfig` reads for `config.lora`."""
  lora = config.lora
  if lora is None:
    raise CheckpointError("the model config has no LoRAConfig: nothing to export as a PEFT adapter")
  return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
          "revision": revision, "r": int(lora.rank), "lora_alpha": float(lora.alpha),
          "lora_dropout": float(lora.dropout), "target_modules": sorted(lora.targets),
          "fan_in_fan_out": config.arch == "gpt2", "bias": "none", "lora_bias": False, "use_rslora": False,
          "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
          "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def _lora_leaves(config: ModelConfig) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(abstract_variables(Transformer(config))["lora"])


def save_peft_adapter(path: PathLike, config: ModelConfig, lora: dict, *, base_model_name_or_path: str,
                      revision: str | None = None, dtype: str | None = None, overwrite: bool = False,
                      extra_files: dict[str, str] | None = None) -> pathlib.Path:
  """Write the "lora" collection of a model with `config.lora` as a PEFT LoRA adapter directory.

  Args:
    path: output directory (must be absent or empty unless `overwrite`; written to a temporary sibling
      and renamed into place, like `save_hf_model`).
    config: the model config (its `lora` gives r, alpha, dropout, targets).
    lora: the "lora" collection ({"layers": {"attn": {"q_proj": {"a": [L, in, r], "b": [L, r, out]}}}}).
    base_model_name_or_path: what PEFT loads the adapter onto (a Hub id or a directory holding the
      base weights the adapter was trained on).
    revision: the base model's Hub revision, when it has one.
    dtype: tensor dtype in the file (default each leaf's own).
    extra_files: name -> text, written next to the adapter (e.g. a model card README.md).
  """
  path = pathlib.Path(path)
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise CheckpointError(f"{path}: directory exists and is not empty (pass overwrite=True to replace it)")
  cfg_json = peft_config_dict(config, base_model_name_or_path, revision=revision)
  names = _module_names(config)
  expected = _lora_leaves(config)
  flat = flax.traverse_util.flatten_dict(dict(lora))
  if set(flat) != set(expected):
    raise CheckpointError(f"lora variables do not match the config's targets: have {sorted('/'.join(p) for p in flat)}, "
                          f"expected {sorted('/'.join(p) for p in expected)}")
  entries = []
  for leaf_path in sorted(expected, key=lambda p: (p[:-1], p[-1])):
    module, ab = leaf_path[:-1], leaf_path[-1]
    if module not in names:
      raise CheckpointError(f"lora variables: no transformers module for {'/'.join(module)}")
    leaf = flat[leaf_path]
    if tuple(np.shape(leaf)) != tuple(expected[leaf_path].shape):
      raise CheckpointError(f"lora variables: {'/'.join(leaf_path)} has shape {list(np.shape(leaf))}, expected "
                            f"{list(expected[leaf_path].shape)}")
    dt = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(leaf.dtype)
    if dt not in DTYPE_CODES:
      raise CheckpointError(f"lora variables: {'/'.join(leaf_path)} has non-float dtype {dt}")
    per_layer = leaf_path[0] == "layers"
    for i in range(config.n_layers if per_layer else 1):
      name = PEFT_PREFIX + names[module].format(i=i) + (".lora_A.weight" if ab == "a" else ".lora_B.weight")

      def fetch(leaf=leaf, i=i, per_layer=per_layer, dt=dt):
        x = _to_host(leaf[i] if per_layer else leaf)
        return np.ascontiguousarray(x.T).astype(dt)

      shape = tuple(reversed(expected[leaf_path].shape[1:] if per_layer else expected[leaf_path].shape))
      entries.append((name, shape, dt, fetch))
  entries.sort(key=lambda e: e[0])
  writer = jax.process_index() == 0
  with staged_directory(path, write=writer) as tmp:
    if writer:
      (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
      write_safetensors(tmp / ADAPTER_WEIGHTS, entries)
      for fname, text in (extra_files or {}).items():
        (tmp / fname).write_text(text)
    else:  # other hosts take part in the gathers only
      for e in entries:
        e[3]()
  return path


def read_peft_config(path: PathLike) -> tuple[dict, LoRAConfig]:
  """adapter_config.json of a PEFT LoRA adapter -> (the dict, the matching `LoRAConfig`)."""
  file = pathlib.Path(path) / ADAPTER_CONFIG
  cfg = read_json_object(path, ADAPTER_CONFIG, "a PEFT adapter")
  if cfg.get("peft_type") != "LORA":
    raise CheckpointError(f"{file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
  unsupported = {"use_dora": True, "use_rslora": True, "lora_bias": True}
  for key, bad in unsupported.items():
    if cfg.get(key) == bad:
      raise CheckpointError(f"{file}: {key}={bad} is not supported")
  for key in ("rank_pattern", "alpha_pattern"):
    if cfg.get(key):
      raise CheckpointError(f"{file}: {key} (per-module rank / alpha) is not supported")
  for key in ("layers_to_transform", "modules_to_save"):
    if cfg.get(key):
      raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported")
  if cfg.get("bias", "none") != "none":
    raise CheckpointError(f"{file}: bias={cfg['bias']!r} is not supported (only 'none')")
  targets = cfg.get("target_modules")
  if not isinstance(targets, list):
    raise CheckpointError(f"{file}: target_modules must be a list of module names, got {targets!r}")
  try:
    lora = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=tuple(sorted(targets)))
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{file}: {e}") from e
  return cfg, lora


def load_peft_adapter(path: PathLike, config: ModelConfig, *, revision: str | None = None
                      ) -> tuple[ModelConfig, dict]:
  """A PEFT LoRA adapter (a directory or a Hub id) for a base model of `config` ->
  ``(config with its LoRAConfig, the "lora" collection)``; run it as
  ``Transformer(config).apply({"params": base_params, "lora": lora}, ...)``."""
  path = resolve_pretrained(path, revision=revision, allow_patterns=ADAPTER_PATTERNS)
  cfg, lora_cfg = read_peft_config(path)
  want_fifo = config.arch == "gpt2"
  if bool(cfg.get("fan_in_fan_out", False)) != want_fifo:
    raise CheckpointError(f"{path / ADAPTER_CONFIG}: fan_in_fan_out={cfg.get('fan_in_fan_out')} but the base model "
                          f"{'uses' if want_fifo else 'does not use'} Conv1D weights")
  config = config.replace(lora=lora_cfg)
  names = _module_names(config)
  expected = _lora_leaves(config)
  file = path / ADAPTER_WEIGHTS
  if not file.is_file():
    raise CheckpointError(f"{file}: not found (only safetensors adapters are read)")
  flat = {}
  with safe_open(str(file), framework="np") as f:
    keys = set(f.keys())
    used = set()
    for leaf_path, leaf in expected.items():
      module, ab = leaf_path[:-1], leaf_path[-1]
      per_layer = leaf_path[0] == "layers"
      parts = []
      for i in range(config.n_layers if per_layer else 1):
        name = PEFT_PREFIX + names[module].format(i=i) + (".lora_A.weight" if ab == "a" else ".lora_B.weight")
        if name not in keys:
          raise CheckpointError(f"{file}: missing tensor {name}")
        x = f.get_tensor(name)
        want = tuple(reversed(leaf.shape[1:] if per_layer else leaf.shape))
        if tuple(x.shape) != want:
          raise CheckpointError(f"{file}: tensor {name} has shape {list(x.shape)}, expected {list(want)}")
        parts.append(np.asarray(x, np.float32).T)
        used.add(name)
      flat[leaf_path] = jax.device_put((np.stack(parts) if per_layer else parts[0]).astype(leaf.dtype))
  extra = sorted(keys - used)
  if extra:
    raise CheckpointError(f"{file}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  return config, flax.traverse_util.unflatten_dict(flat)
