"""Import / export of Hugging Face `transformers` checkpoints (config.json + safetensors).

Supported architectures (`SUPPORTED_ARCHITECTURES`): LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text), GPT2LMHeadModel and
the sequence classifiers Llama/Mistral/Qwen2/Qwen3/Gemma2/GPT2ForSequenceClassification and
Gemma3TextForSequenceClassification. See docs/models.md for the config mapping and what is not
supported.

Loading validates everything first (config options, every tensor's presence, shape and dtype, from
the safetensors headers only) and raises `CheckpointError` naming the file and the tensor before any
tensor data is read. It then builds one parameter at a time: without a mesh, on the default device;
with a mesh, with `jax.make_array_from_callback`, whose callback reads only the requested shard's
slice from the memory-mapped safetensors file(s) (stacking the per-layer slices for the leading
`layers` axis and transposing nn.Linear weights), so a large model never sits whole in one host's
memory and on multi-host meshes each host reads only its own shards.

Saving writes a temp directory (config.json, optional tokenizer files, safetensors shards streamed
one tensor at a time, an index above `max_shard_size`) and renames it into place, so a failure never
leaves a half-written or clobbered checkpoint.

This module maps parameters onto transformers' tensor names and back. The config.json side
(`read_hf_config`, `hf_config_to_model_config`, `model_config_to_hf_config`, `SUPPORTED_ARCHITECTURES`,
`CheckpointError`) is `pro_jax.models.hf_config` (importable from here too); the safetensors format
(shards, headers, sliced reads, streamed writes) is `pro_jax.models.safetensors_io`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from pro_jax import sharding as sh
from pro_jax.data.files import staged_directory
from pro_jax.models.config import LoRAConfig, ModelConfig
from pro_jax.models.hf_config import (SUPPORTED_ARCHITECTURES, CheckpointError, PathLike, default_architecture,
                                      hf_architecture, hf_config_to_model_config, model_config_to_hf_config,
                                      read_hf_config)
from pro_jax.models.hub import resolve_pretrained
from pro_jax.models.lora import lora_delta
from pro_jax.models.safetensors_io import (DTYPE_CODES, FLOAT_DTYPES, TensorInfo, TensorReader, checkpoint_files,
                                           parse_size, read_headers, write_safetensors)
from pro_jax.models.transformer import Transformer, abstract_variables, logical_axes

__all__ = ["ARCHITECTURE_LOADERS", "SUPPORTED_ARCHITECTURES", "CheckpointError", "default_architecture",
           "hf_architecture", "hf_config_to_model_config", "load_hf_model", "model_config_to_hf_config",
           "params_from_hf_tensors", "permute_rotary", "read_hf_config", "save_hf_model"]

log = logging.getLogger(__name__)

_BODY_PREFIX = {"llama": "model.", "gpt2": "transformer."}
# Non-parameter buffers some checkpoints carry; transformers ignores them too.
_IGNORED_TENSORS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")


def permute_rotary(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Interleaved-pair RoPE rows -> half-rotation rows (transformers' convert_llama_weights_to_hf).

  Works on the rows (axis 0) of a weight [out, in] or a bias [out]; llama.cpp's GGUF q/k tensors use
  the same interleaved layout, so `pro_jax.models.gguf` undoes their permutation with this too.
  """
  out, rest = w_OxI.shape[0], w_OxI.shape[1:]
  return w_OxI.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_OxI.shape)


# Loaders of architectures outside `Transformer`, tried first by `load_hf_model`:
# `loader(path, hf_config_dict, **load_hf_model's options) -> (model, params)`, or None when the
# directory is not theirs. `pro_jax.models.encoders` registers the DistilBERT / BART classifiers (the
# `pro_jax.models` package imports it, so the entry is there whichever module is imported first).
ARCHITECTURE_LOADERS: list[Callable[..., tuple[Any, dict] | None]] = []


def _check_finite(read: Callable[[tuple[slice, ...]], np.ndarray], spec: "_Spec", file_of: Callable[[str], str],
                  dtype: Any) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """`read` that raises CheckpointError naming the file and tensor when the values it read (after
  conversion to `dtype`) hold NaN or inf: a model that cannot train (every step would be skipped)."""

  def checked(index: tuple[slice, ...]) -> np.ndarray:
    arr = read(index)
    finite = np.isfinite(arr.astype(np.float32, copy=False))
    if not finite.all():
      at = np.argwhere(~finite)[0]
      name = spec.names[index[0].start + int(at[0])] if spec.stacked else spec.names[0]
      raise CheckpointError(f"{file_of(name)}: tensor {name} holds NaN / inf values (as "
                            f"{np.dtype(dtype).name}); refusing to load a model that cannot train")
    return arr

  return checked


# ----------------------------------------------------------------------------------------------
# parameter <-> tensor-name mapping


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one pro_jax parameter maps onto HF tensors."""

  path: tuple[str, ...]  # key path in the "params" collection
  names: tuple[str, ...]  # HF tensor name(s): one per layer when stacked; () = not in HF (new head)
  hf_shape: tuple[int, ...]  # shape of each HF tensor
  transpose: bool  # nn.Linear weight [out, in] <-> our kernel [in, out]
  stacked: bool  # leading `layers` axis


def _hf_names(config: ModelConfig, prefix: str) -> list[tuple]:
  """[(our path, HF name or per-layer template with {i}, transpose)]."""
  L = "layers"
  if config.arch == "gpt2":
    h = f"{prefix}h.{{i}}."
    out = [(("embed",), f"{prefix}wte.weight", False), (("wpe",), f"{prefix}wpe.weight", False)]
    out += [((L, "attn_norm", "scale"), h + "ln_1.weight", False), ((L, "attn_norm", "bias"), h + "ln_1.bias", False),
            ((L, "attn", "c_attn", "kernel"), h + "attn.c_attn.weight", False),
            ((L, "attn", "c_attn", "bias"), h + "attn.c_attn.bias", False),
            ((L, "attn", "c_proj", "kernel"), h + "attn.c_proj.weight", False),
            ((L, "attn", "c_proj", "bias"), h + "attn.c_proj.bias", False),
            ((L, "mlp_norm", "scale"), h + "ln_2.weight", False), ((L, "mlp_norm", "bias"), h + "ln_2.bias", False),
            ((L, "mlp", "c_fc", "kernel"), h + "mlp.c_fc.weight", False),
            ((L, "mlp", "c_fc", "bias"), h + "mlp.c_fc.bias", False),
            ((L, "mlp", "c_proj", "kernel"), h + "mlp.c_proj.weight", False),
            ((L, "mlp", "c_proj", "bias"), h + "mlp.c_proj.bias", False),
            (("final_norm", "scale"), f"{prefix}ln_f.weight", False),
            (("final_norm", "bias"), f"{prefix}ln_f.bias", False)]
  else:
    h = f"{prefix}layers.{{i}}."
    out = [(("embed",), f"{prefix}embed_tokens.weight", False),
           ((L, "attn_norm", "scale"), h + "input_layernorm.weight", False)]
    if config.sandwich_norms:  # Gemma 2 / 3: HF's post_attention_layernorm norms the attention output
      out += [((L, "post_attn_norm", "scale"), h + "post_attention_layernorm.weight", False),
              ((L, "mlp_norm", "scale"), h + "pre_feedforward_layernorm.weight", False),
              ((L, "post_mlp_norm", "scale"), h + "post_feedforward_layernorm.weight", False)]
    else:
      out.append(((L, "mlp_norm", "scale"), h + "post_attention_layernorm.weight", False))
    if config.qk_norm:
      out += [((L, "attn", "q_norm", "scale"), h + "self_attn.q_norm.weight", False),
              ((L, "attn", "k_norm", "scale"), h + "self_attn.k_norm.weight", False)]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out.append(((L, "attn", proj, "kernel"), h + f"self_attn.{proj}.weight", True))
      if config.o_bias if proj == "o_proj" else config.qkv_bias:
        out.append(((L, "attn", proj, "bias"), h + f"self_attn.{proj}.bias", False))
    for proj in ("gate_proj", "up_proj", "down_proj"):
      out.append(((L, "mlp", proj, "kernel"), h + f"mlp.{proj}.weight", True))
      if config.mlp_bias:
        out.append(((L, "mlp", proj, "bias"), h + f"mlp.{proj}.bias", False))
    out.append((("final_norm", "scale"), f"{prefix}norm.weight", False))
  if config.head == "lm" and not config.tie_embeddings:
    out.append((("lm_head", "kernel"), "lm_head.weight", True))
  if config.head == "score":
    out.append((("score", "kernel"), "score.weight", True))
  return out


def _specs(config: ModelConfig, abstract_params: dict, prefix: str, n_positions: int | None = None,
           new_paths: Sequence[tuple[str, ...]] = ()) -> list[_Spec]:
  flat = flax.traverse_util.flatten_dict(abstract_params)
  specs, seen = [], set()
  for path, name, transpose in _hf_names(config, prefix):
    shape = tuple(flat[path].shape)
    stacked = path[0] == "layers"
    per = shape[1:] if stacked else shape
    hf_shape = tuple(reversed(per)) if transpose else per
    if path == ("wpe",) and n_positions is not None:
      hf_shape = (n_positions,) + hf_shape[1:]
    names = tuple(name.format(i=i) for i in range(config.n_layers)) if stacked else (name,)
    specs.append(_Spec(path, () if path in new_paths else names, hf_shape, transpose, stacked))
    seen.add(path)
  for path in flat:  # parameters HF has no tensor for (value head)
    if path not in seen:
      specs.append(_Spec(path, (), tuple(flat[path].shape), False, False))
  return specs


# ----------------------------------------------------------------------------------------------
# reading


def _normalize_index(index: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
  index = tuple(index) if index is not None else ()
  index = index + (slice(None),) * (len(shape) - len(index))
  out = []
  for sl, dim in zip(index, shape):
    start, stop, step = sl.indices(dim)
    if step != 1:
      raise ValueError(f"strided shard index {sl} is not supported")
    out.append(slice(start, stop))
  return tuple(out)


def _spec_reader(spec: _Spec, reader: TensorReader, shape: tuple[int, ...],
                 dtype: Any) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """index (slices into our parameter) -> np.ndarray in `dtype`, reading only that slice."""

  def read(index: tuple[slice, ...]) -> np.ndarray:
    if spec.stacked:
      layers = range(index[0].start, index[0].stop)
      parts = [reader.read(spec.names[i], index[1:], spec.transpose) for i in layers]
      arr = np.stack(parts) if parts else np.zeros((0,) + tuple(s.stop - s.start for s in index[1:]))
    else:
      arr = reader.read(spec.names[0], index, spec.transpose)
    return np.ascontiguousarray(arr.astype(dtype, copy=False))

  return read


def _place(shape: tuple[int, ...], dtype: Any, sharding: Any,
           read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
  """One parameter onto its device(s): whole (no mesh) or shard by shard (a callback per shard)."""
  if sharding is None:
    return jax.device_put(read(_normalize_index(None, shape)))
  cache: dict[tuple, np.ndarray] = {}  # replicated shards are read once

  def callback(index):
    idx = _normalize_index(index, shape)
    key = tuple((s.start, s.stop) for s in idx)
    if key not in cache:
      cache[key] = read(idx)
    return cache[key]

  return jax.make_array_from_callback(shape, sharding, callback, dtype=dtype)


def _new_param(path: tuple[str, ...], shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
  """A parameter the checkpoint has no tensor for (a new score / value head): the model's own init
  (kernel ~ N(0, 0.02^2), bias 0)."""
  if path[-1] == "bias":
    return np.zeros(shape, dtype)
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(path).encode()) % (2**31))
  return np.asarray(0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _plan(path: pathlib.Path, config: ModelConfig, arch: str, hf: dict,
          abstract_params: dict) -> tuple[list[_Spec], dict[str, TensorInfo]]:
  """Every check on the checkpoint's tensors (presence, shape, dtype, nothing unexpected)."""
  files, index = checkpoint_files(path)
  tensors = read_headers(files, index)
  where = str(index or files[0])
  model_type, ckpt_head = SUPPORTED_ARCHITECTURES[arch]
  family = "gpt2" if model_type == "gpt2" else "llama"
  embed = "wte.weight" if family == "gpt2" else "embed_tokens.weight"
  prefix = _BODY_PREFIX[family]
  if prefix + embed not in tensors and embed in tensors:
    prefix = ""  # e.g. the original GPT-2 checkpoints: h.0.attn..., wte.weight
  new_paths = []
  if config.head == "score" and ckpt_head != "score":
    new_paths.append(("score", "kernel"))
  n_positions = int(hf["n_positions"]) if family == "gpt2" else None
  specs = _specs(config, abstract_params, prefix, n_positions, new_paths)
  expected = set()
  for spec in specs:
    for name in spec.names:
      expected.add(name)
      info = tensors.get(name)
      if info is None:
        raise CheckpointError(f"{where}: missing tensor {name} (expected shape {list(spec.hf_shape)}) "
                              f"for {arch}")
      if info.shape != spec.hf_shape:
        raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                              f"{list(spec.hf_shape)} from config.json")
      if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; only float tensors "
                              f"{sorted(FLOAT_DTYPES)} are supported (no quantized checkpoints)")
  ignored = set()
  if config.tie_embeddings or config.head != "lm":
    ignored.add("lm_head.weight")  # transformers ties it to the embedding / a new head replaces it
  if config.head != "score" and ckpt_head == "score":
    ignored.add("score.weight")
  for name, info in tensors.items():
    if name not in expected and name not in ignored and not _IGNORED_TENSORS.search(name):
      raise CheckpointError(f"{info.file}: unexpected tensor {name} (shape {list(info.shape)}) for {arch} "
                            f"with config.json's settings")
  return specs, tensors


def load_hf_model(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32", mesh: Any = None,
                  rules: Any = None, head: str | None = None, num_labels: int | None = None,
                  value_head: bool = False, lora: LoRAConfig | None = None, max_seq_len: int | None = None,
                  seed: int = 0, revision: str | None = None, cache_dir: PathLike | None = None,
                  **config_overrides) -> tuple[Transformer, dict]:
  """Load a transformers checkpoint directory (or a Hugging Face Hub id) as `(Transformer, params)`.

  Args:
    path: directory with config.json and model.safetensors (or sharded files + index), or a Hub id
      ``ORG/NAME[@REVISION]`` fetched through `pro_jax.models.hub.resolve_pretrained` (cache, token
      and offline mode from the environment; only configs and safetensors are downloaded).
    dtype / param_dtype: compute / parameter dtypes (tensors are converted, e.g. bf16 -> float32).
    mesh: place each parameter with its `pro_jax.sharding.param_shardings` NamedSharding, reading only
      each shard's slice; None = the default device, one tensor at a time.
    rules: logical-axis rules (default `pro_jax.sharding.RULES`), restated on the mesh's own axis names
      (`pro_jax.sharding.rules_for_mesh`: e.g. a ``("data", "model")`` or ``("fsdp",)`` mesh works).
    head: "lm" | "score" | "none"; default the checkpoint's. A score head the checkpoint lacks (e.g.
      a reward model initialised from a causal LM) is initialised N(0, 0.02^2), like `value_head`.
    num_labels: width of the score head (default: the checkpoint's id2label, else 1).
    lora: a LoRAConfig to attach to the model config (the returned params hold only base weights).
    max_seq_len: override max_position_embeddings (GPT-2: at most n_positions; wpe is cut).
    seed: for newly initialised heads.
    revision / cache_dir: for a Hub id (branch, tag or commit; the Hub cache directory).
    config_overrides: further ModelConfig fields (e.g. remat="full", attention_impl="cudnn").

  Returns:
    (model, params) with `model.apply({"params": params}, tokens_BxL, mask_BxL).logits` (or .scores).
    DistilBERT / BART sequence classifiers come back as `pro_jax.models.encoders.EncoderClassifier`
    (`.scores` only; see `encoders.load_hf_classifier`).
  """
  path = resolve_pretrained(path, revision=revision, cache_dir=cache_dir)
  hf = read_hf_config(path)
  for loader in ARCHITECTURE_LOADERS:
    loaded = loader(path, hf, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, head=head,
                    num_labels=num_labels, value_head=value_head, lora=lora, max_seq_len=max_seq_len,
                    config_overrides=config_overrides)
    if loaded is not None:
      return loaded
  config, arch = hf_config_to_model_config(
      hf, source=str(path / "config.json"), head=head, num_labels=num_labels, value_head=value_head, lora=lora,
      dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len, **config_overrides)
  model = Transformer(config)
  abstract = abstract_variables(model)["params"]
  specs, tensors = _plan(path, config, arch, hf, abstract)

  with TensorReader(tensors) as reader:
    params = _materialize(model, specs, reader, mesh=mesh, rules=rules, seed=seed, source=str(path),
                          file_of=lambda name: tensors[name].file)
  return model, params


def _materialize(model: Transformer, specs: list[_Spec], reader: Any, *, mesh: Any, rules: Any, seed: int,
                 source: str, file_of: Callable[[str], str] | None = None) -> dict:
  """The params tree: each spec read through `reader.read(name, index, transpose)` (HF layout) and
  placed whole (no mesh) or shard by shard; specs without names get the model's own init.
  `reader.release()`, when it exists, is called after each parameter (readers that cache decoded
  tensors free them there). Values that are NaN / inf are a CheckpointError naming the tensor and its
  file (`file_of(name)`, default `source`)."""
  abstract = abstract_variables(model)["params"]
  shardings = None
  if mesh is not None:
    all_shardings = sh.param_shardings(logical_axes(model), abstract_variables(model), mesh, rules)
    shardings = flax.traverse_util.flatten_dict(all_shardings["params"])
  flat_abstract = flax.traverse_util.flatten_dict(abstract)
  flat_params = {}
  for spec in specs:
    leaf = flat_abstract[spec.path]
    shape, leaf_dtype = tuple(leaf.shape), leaf.dtype
    if spec.names:
      read = _check_finite(_spec_reader(spec, reader, shape, leaf_dtype), spec, file_of or (lambda name: source),
                           leaf_dtype)
    else:
      log.info("%s: no tensor for %s in the checkpoint; initialised N(0, 0.02^2) / zeros", source,
               "/".join(spec.path))
      full = _new_param(spec.path, shape, leaf_dtype, seed)
      read = lambda idx, full=full: full[idx]  # noqa: E731
    flat_params[spec.path] = _place(shape, leaf_dtype, None if shardings is None else shardings[spec.path], read)
    if hasattr(reader, "release"):
      reader.release()
  return flax.traverse_util.unflatten_dict(flat_params)


def params_from_hf_tensors(model: Transformer, source: Any, *, where: str, mesh: Any = None, rules: Any = None,
                           seed: int = 0, new_heads: bool = True,
                           ignored: Sequence[str] = ()) -> dict:
  """The params of `model` from HF-named tensors held by something other than safetensors files.

  `source` has `shapes: Mapping[str, tuple[int, ...]]` (every tensor it holds, by transformers name,
  in transformers' layout: nn.Linear weights [out, in]) and `read(name, index, transpose) ->
  np.ndarray` (the tensor at `index`, slices into our layout; `transpose` for nn.Linear weights),
  optionally `release()`. Llama-family names only (``model.layers.{i}....``, ``lm_head.weight``).
  Checks presence and shape of every tensor the model needs and refuses unknown ones (names other
  than `ignored`), naming `where`, before reading any data. With `new_heads`, a score head the
  tensors lack is initialised (as `load_hf_model` does for a reward model made from a causal LM).
  """
  config = model.config
  abstract = abstract_variables(model)["params"]
  new_paths = [("score", "kernel")] if new_heads and config.head == "score" and "score.weight" not in source.shapes \
      else []
  specs = _specs(config, abstract, _BODY_PREFIX["gpt2" if config.arch == "gpt2" else "llama"], None, new_paths)
  expected = set()
  for spec in specs:
    for name in spec.names:
      expected.add(name)
      if name not in source.shapes:
        raise CheckpointError(f"{where}: missing tensor {name} (expected shape {list(spec.hf_shape)})")
      if tuple(source.shapes[name]) != spec.hf_shape:
        raise CheckpointError(f"{where}: tensor {name} has shape {list(source.shapes[name])}, expected "
                              f"{list(spec.hf_shape)} from the model config")
  skip = set(ignored)
  if config.tie_embeddings or config.head != "lm":
    skip.add("lm_head.weight")
  for name, shape in source.shapes.items():
    if name not in expected and name not in skip:
      raise CheckpointError(f"{where}: unexpected tensor {name} (shape {list(shape)}) for this model config")
  return _materialize(model, specs, source, mesh=mesh, rules=rules, seed=seed, source=where)


def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _merge_lora(config: ModelConfig, kernel: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """One layer's W + a @ b * alpha / r in float32 (kernel [in, out], a [in, r], b [r, out]), as
  `pro_jax.models.lora.merge_lora` computes it for the whole stacked tree; done per layer here so
  the export streams."""
  return (kernel.astype(np.float32) + np.asarray(lora_delta(config, a, b))).astype(kernel.dtype)


def _check_tree(tree: Any, abstract: Any, what: str) -> dict:
  flat = flax.traverse_util.flatten_dict(dict(tree)) if isinstance(tree, Mapping) else None
  if flat is None:
    raise CheckpointError(f"{what}: expected a nested dict of arrays, got {type(tree).__name__}")
  ref = flax.traverse_util.flatten_dict(abstract)
  missing = sorted("/".join(p) for p in set(ref) - set(flat))
  extra = sorted("/".join(p) for p in set(flat) - set(ref))
  if missing or extra:
    raise CheckpointError(f"{what} do not match the model config: missing {missing}, unexpected {extra}")
  for p, leaf in ref.items():
    if tuple(np.shape(flat[p])) != tuple(leaf.shape):
      raise CheckpointError(f"{what}: {'/'.join(p)} has shape {list(np.shape(flat[p]))}, expected {list(leaf.shape)}")
  return flat


# ----------------------------------------------------------------------------------------------
# writing


def save_hf_model(path: PathLike, model_or_config: Transformer | ModelConfig, params: dict, *,
                  lora: dict | None = None, tokenizer: Any = None, max_shard_size: int | str = "5GB",
                  architecture: str | None = None, dtype: str | None = None,
                  overwrite: bool = False) -> pathlib.Path:
  """Write `params` as a transformers checkpoint directory (config.json + safetensors [+ tokenizer]).

  Args:
    path: output directory; must not exist or be empty unless `overwrite=True`.
    model_or_config: the `Transformer` or its `ModelConfig`.
    params: the "params" collection.
    lora: the "lora" collection; merged into the kernels (W + a @ b * alpha / r, config.lora's scale).
    tokenizer: anything with `save_pretrained(dir)` (a transformers tokenizer).
    max_shard_size: shards above this size ("5GB", "200MB", bytes) -> model-0000k-of-0000n.safetensors +
      model.safetensors.index.json (transformers' naming; GB = 10^9).
    architecture: the transformers class; default `default_architecture(config)`.
    dtype: tensor dtype in the files (e.g. "bfloat16"); default each parameter's own dtype.
    overwrite: replace an existing non-empty directory (only after the new one is fully written).

  The value head (PPO critic) has no transformers equivalent and is not written (a warning says so).
  """
  config = model_or_config.config if isinstance(model_or_config, Transformer) else model_or_config
  if not isinstance(config, ModelConfig):
    raise TypeError(f"model_or_config must be a Transformer or ModelConfig, got {type(model_or_config).__name__}")
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise CheckpointError(f"{path}: exists and is not a directory")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise CheckpointError(f"{path}: directory exists and is not empty (pass overwrite=True to replace it)")
  if config.head == "none":
    raise CheckpointError("a model with head='none' has no transformers class to export to (use lm or score)")
  arch = architecture or default_architecture(config)
  out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  if out_dtype is not None and out_dtype not in DTYPE_CODES:
    raise ValueError(f"dtype {dtype!r}: not a float dtype safetensors can hold")
  model_config_to_hf_config(config, arch)  # refuses configs the class cannot express, before any work
  shard_bytes = parse_size(max_shard_size)

  abstract = abstract_variables(Transformer(config))
  flat = _check_tree(params, abstract["params"], "params")
  flat_lora = {}
  if lora is not None:
    if config.lora is None or "lora" not in abstract:
      raise CheckpointError("lora variables given but the model config has no LoRAConfig (needed for alpha / r)")
    flat_lora = _check_tree(lora, abstract["lora"], "lora variables")
  if config.head == "score" and config.pad_token_id is None:
    warnings.warn("save_hf_model: pad_token_id is None; transformers' sequence classifiers then refuse batches "
                  "of more than one row (they find the last token by input_ids != pad_token_id)", stacklevel=2)
  if config.value_head:
    warnings.warn("save_hf_model: the value head has no transformers equivalent and is not exported", stacklevel=2)

  body = _BODY_PREFIX["gpt2" if config.arch == "gpt2" else "llama"]
  specs = [s for s in _specs(config, abstract["params"], body) if s.names]
  entries = []  # (name, shape, dtype, fetch)
  for spec in specs:
    leaf = flat[spec.path]
    dt = out_dtype if out_dtype is not None else np.dtype(leaf.dtype)
    if dt not in DTYPE_CODES:
      raise CheckpointError(f"params: {'/'.join(spec.path)} has dtype {leaf.dtype}, not a float dtype")
    lora_ab = None
    if spec.path[-1] == "kernel" and spec.path[:-1] + ("a",) in flat_lora:
      lora_ab = (flat_lora[spec.path[:-1] + ("a",)], flat_lora[spec.path[:-1] + ("b",)])
    for i, name in enumerate(spec.names):

      def fetch(leaf=leaf, i=i, spec=spec, lora_ab=lora_ab, dt=dt):
        x = _to_host(leaf[i] if spec.stacked else leaf)
        if lora_ab is not None:
          a, b = (_to_host(t[i] if spec.stacked else t) for t in lora_ab)
          x = _merge_lora(config, x, a, b)
        return (x.T if spec.transpose else x).astype(dt)

      entries.append((name, spec.hf_shape, dt, fetch))

  written = {e[2] for e in entries}
  hf_config = model_config_to_hf_config(
      config, arch, str(jnp.dtype(written.pop())) if len(written) == 1 else config.param_dtype)
  shards: list[list] = [[]]
  size = 0
  for e in entries:
    nbytes = math.prod(e[1]) * e[2].itemsize
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes

  writer = jax.process_index() == 0
  with staged_directory(path, write=writer) as tmp:
    if writer:
      (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
      if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
      fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
      if writer:
        write_safetensors(tmp / fname, shard)
      else:  # other hosts take part in the gathers only
        for e in shard:
          e[3]()
      weight_map.update({e[0]: fname for e in shard})
    if writer and n > 1:
      total = sum(math.prod(e[1]) * e[2].itemsize for e in entries)
      n_params = sum(math.prod(e[1]) for e in entries)
      index = {"metadata": {"total_size": total, "total_parameters": n_params}, "weight_map": weight_map}
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return path
