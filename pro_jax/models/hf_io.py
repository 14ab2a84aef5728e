"""Import / export of Hugging Face `transformers` checkpoints (config.json + safetensors).

Supported architectures (`SUPPORTED_ARCHITECTURES`): LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, GPT2LMHeadModel and the sequence classifiers Llama/Mistral/Qwen2/GPT2
ForSequenceClassification. See docs/models.md for the config mapping and what is not supported.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import struct
import uuid
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from pro_jax import sharding as sh
from pro_jax.models.config import LoRAConfig, ModelConfig, RopeScaling
from pro_jax.models.lora import lora_delta
from pro_jax.models.transformer import Transformer, abstract_variables, logical_axes

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# architecture -> (model_type, head)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "lm"),
    "MistralForCausalLM": ("mistral", "lm"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "LlamaForSequenceClassification": ("llama", "score"),
    "MistralForSequenceClassification": ("mistral", "score"),
    "Qwen2ForSequenceClassification": ("qwen2", "score"),
    "GPT2ForSequenceClassification": ("gpt2", "score"),
}
_CAUSAL_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
_BODY_PREFIX = {"llama": "model.", "gpt2": "transformer."}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are tanh-approximate GELU
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}
_ST_DTYPE_CODE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16",
                  np.dtype(np.float64): "F64"}
# Non-parameter buffers some checkpoints carry; transformers ignores them too.
_IGNORED_TENSORS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
  """A checkpoint (or config) that cannot be loaded or saved; the message names the file and tensor."""


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def read_hf_config(path: PathLike) -> dict:
  """The parsed config.json of a checkpoint directory."""
  cfg_file = pathlib.Path(path) / "config.json"
  if not cfg_file.is_file():
    raise CheckpointError(f"{cfg_file}: not found (is {path} a transformers checkpoint directory?)")
  try:
    hf = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
  if not isinstance(hf, dict):
    raise CheckpointError(f"{cfg_file}: expected a JSON object")
  return hf


def hf_architecture(hf: dict, source: str = "config.json") -> str:
  """The (single, supported) architecture named by a config; CausalLM when only model_type is given."""
  archs = hf.get("architectures") or []
  if not archs:
    arch = _CAUSAL_BY_MODEL_TYPE.get(hf.get("model_type"))
    if arch is None:
      raise CheckpointError(f"{source}: no 'architectures' and unsupported model_type {hf.get('model_type')!r}; "
                            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    return arch
  if len(archs) != 1:
    raise CheckpointError(f"{source}: expected one architecture, found {archs}")
  arch = archs[0]
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"{source}: unsupported architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
  model_type = SUPPORTED_ARCHITECTURES[arch][0]
  if hf.get("model_type", model_type) != model_type:
    raise CheckpointError(f"{source}: architecture {arch} needs model_type {model_type!r}, "
                          f"found {hf.get('model_type')!r}")
  return arch


def _field(hf: dict, key: str, source: str, default: Any = dataclasses.MISSING) -> Any:
  value = hf.get(key)
  if value is None:
    if default is dataclasses.MISSING:
      raise CheckpointError(f"{source}: missing field {key!r}")
    return default
  return value


def _unsupported(source: str, what: str) -> CheckpointError:
  return CheckpointError(f"{source}: unsupported {what} (pro_jax would not reproduce transformers' outputs)")


def _rope_from_hf(hf: dict, source: str) -> tuple[float, RopeScaling]:
  """RoPE theta and scaling from v5 `rope_parameters` or the older `rope_theta` + `rope_scaling`.

  Same precedence as transformers 5: `rope_scaling` (when set) over `rope_parameters`; `rope_theta`
  inside the dict over the top-level one over 10000.
  """
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if not isinstance(params, dict):
    raise CheckpointError(f"{source}: rope_parameters / rope_scaling must be an object, got {params!r}")
  if any(isinstance(v, dict) for v in params.values()):
    raise _unsupported(source, f"per-layer-type rope_parameters {sorted(params)}")
  theta = float(params.get("rope_theta", hf.get("rope_theta") or 10000.0))
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial is not None and float(partial) != 1.0:
    raise _unsupported(source, f"partial_rotary_factor={partial}")
  rope_type = params.get("rope_type", params.get("type", "default"))
  try:
    if rope_type == "default":
      return theta, RopeScaling()
    if rope_type == "linear":
      return theta, RopeScaling(type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
      orig = (hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
              or hf["max_position_embeddings"])
      return theta, RopeScaling(type="llama3", factor=float(params["factor"]),
                                low_freq_factor=float(params["low_freq_factor"]),
                                high_freq_factor=float(params["high_freq_factor"]),
                                original_max_position_embeddings=int(orig))
  except KeyError as e:
    raise CheckpointError(f"{source}: rope type {rope_type!r} needs field {e.args[0]!r}") from e
  raise _unsupported(source, f"rope_type {rope_type!r} (supported: default, linear, llama3)")


def _sliding_window_from_hf(hf: dict, model_type: str, source: str) -> int | None:
  n_layers = int(_field(hf, "num_hidden_layers", source))
  if model_type == "llama":
    return None
  if model_type == "qwen2":
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    max_window_layers = hf.get("max_window_layers", 28)
    default_types = ["sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
                     for i in range(n_layers)]
  else:  # mistral: one window for every layer
    window = hf.get("sliding_window")
    default_types = ["sliding_attention" if window is not None else "full_attention"] * n_layers
  layer_types = hf.get("layer_types") or default_types
  kinds = set(layer_types)
  if not kinds <= {"full_attention", "sliding_attention"} or len(kinds) > 1:
    raise _unsupported(source, f"layer_types {layer_types} (only all-full or all-sliding attention)")
  if kinds == {"sliding_attention"}:
    if window is None:
      raise CheckpointError(f"{source}: sliding_attention layers but no sliding_window")
    return int(window)
  return None


def _first_id(value: Any) -> int | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def _num_labels_from_hf(hf: dict) -> int:
  if isinstance(hf.get("id2label"), dict) and hf["id2label"]:
    return len(hf["id2label"])
  return int(hf.get("num_labels") or 2)


def hf_config_to_model_config(hf: dict, *, source: str = "config.json", head: str | None = None,
                              num_labels: int | None = None, value_head: bool = False,
                              lora: LoRAConfig | None = None, dtype: str = "float32",
                              param_dtype: str = "float32", max_seq_len: int | None = None,
                              **overrides) -> tuple[ModelConfig, str]:
  """Map a transformers config dict onto a `ModelConfig`; returns (config, architecture).

  `head` defaults to the checkpoint's own head ("lm" for *ForCausalLM / GPT2LMHeadModel, "score"
  for *ForSequenceClassification). `overrides` are passed to `ModelConfig` last (e.g. remat).
  """
  arch = hf_architecture(hf, source)
  model_type, ckpt_head = SUPPORTED_ARCHITECTURES[arch]
  head = head or ckpt_head
  if head not in ("lm", "score", "none"):
    raise ValueError(f"head must be 'lm', 'score' or 'none', got {head!r}")
  if num_labels is None:
    num_labels = _num_labels_from_hf(hf) if ckpt_head == "score" else 1
  common = dict(head=head, num_labels=int(num_labels), value_head=value_head, lora=lora, dtype=dtype,
                param_dtype=param_dtype, pad_token_id=_first_id(hf.get("pad_token_id")),
                bos_token_id=_first_id(hf.get("bos_token_id")), eos_token_id=_first_id(hf.get("eos_token_id")))
  if model_type == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
      raise _unsupported(source, f"GPT-2 activation_function {act!r} (supported: {_GPT2_ACTIVATIONS})")
    if not hf.get("scale_attn_weights", True):
      raise _unsupported(source, "GPT-2 scale_attn_weights=false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
      raise _unsupported(source, "GPT-2 scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention", False):
      raise _unsupported(source, "GPT-2 add_cross_attention=true")
    d = int(_field(hf, "n_embd", source))
    n_positions = int(_field(hf, "n_positions", source))
    if max_seq_len is not None and max_seq_len > n_positions:
      raise CheckpointError(f"{source}: max_seq_len={max_seq_len} exceeds GPT-2's n_positions={n_positions} "
                            "(learned position embeddings)")
    kw = dict(arch="gpt2", vocab_size=int(_field(hf, "vocab_size", source)), d_model=d,
              n_layers=int(_field(hf, "n_layer", source)), n_heads=int(_field(hf, "n_head", source)),
              mlp_dim=int(hf.get("n_inner") or 4 * d), max_seq_len=max_seq_len or n_positions,
              norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
              tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
  else:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise _unsupported(source, f"hidden_act {act!r} (only silu / SwiGLU)")
    theta, scaling = _rope_from_hf(hf, source)
    d, n_heads = int(_field(hf, "hidden_size", source)), int(_field(hf, "num_attention_heads", source))
    head_dim = hf.get("head_dim")
    head_dim = None if head_dim is None or (d % n_heads == 0 and int(head_dim) == d // n_heads) else int(head_dim)
    if model_type == "llama":
      qkv_bias = o_bias = bool(hf.get("attention_bias", False))
      mlp_bias = bool(hf.get("mlp_bias", False))
    else:
      qkv_bias, o_bias, mlp_bias = model_type == "qwen2", False, False
    kw = dict(arch="llama", vocab_size=int(_field(hf, "vocab_size", source)), d_model=d,
              n_layers=int(_field(hf, "num_hidden_layers", source)), n_heads=n_heads,
              n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), head_dim=head_dim,
              mlp_dim=int(_field(hf, "intermediate_size", source)),
              max_seq_len=max_seq_len or int(hf.get("max_position_embeddings") or 2048),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
              qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
              sliding_window=_sliding_window_from_hf(hf, model_type, source),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  try:
    config = ModelConfig(**{**kw, **common, **overrides})
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: {e}") from e
  return config, arch


def default_architecture(config: ModelConfig) -> str:
  """The transformers class an export of `config` uses unless told otherwise."""
  if config.arch == "gpt2":
    return "GPT2ForSequenceClassification" if config.head == "score" else "GPT2LMHeadModel"
  if config.qkv_bias and not config.o_bias:
    family = "Qwen2"
  elif config.sliding_window is not None:
    family = "Mistral"
  else:
    family = "Llama"
  return family + ("ForSequenceClassification" if config.head == "score" else "ForCausalLM")


def _check_exportable(config: ModelConfig, arch: str) -> None:
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"unsupported export architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
  model_type, head = SUPPORTED_ARCHITECTURES[arch]
  if config.head != head:
    raise CheckpointError(f"{arch} needs head={head!r}, the model has head={config.head!r}")
  problems = []
  if (model_type == "gpt2") != (config.arch == "gpt2"):
    problems.append(f"arch={config.arch!r}")
  if model_type == "llama":
    if config.qkv_bias != config.o_bias:
      problems.append("qkv_bias != o_bias (Llama's attention_bias covers q, k, v and o)")
    if config.sliding_window is not None:
      problems.append("sliding_window (Llama has none; use Mistral or Qwen2)")
  if model_type == "qwen2" and (not config.qkv_bias or config.o_bias or config.mlp_bias):
    problems.append("Qwen2 has q/k/v biases only (qkv_bias=True, o_bias=False, mlp_bias=False)")
  if model_type == "mistral" and (config.qkv_bias or config.o_bias or config.mlp_bias):
    problems.append("Mistral has no biases")
  if config.arch == "llama" and config.rope_scaling.type not in ("default", "linear", "llama3"):
    problems.append(f"rope_scaling {config.rope_scaling.type!r}")
  if problems:
    raise CheckpointError(f"the model cannot be written as {arch}: {'; '.join(problems)}")


def _rope_to_hf(config: ModelConfig) -> tuple[dict, dict | None]:
  rs = config.rope_scaling
  scaling: dict | None = None
  if rs.type == "linear":
    scaling = {"rope_type": "linear", "factor": rs.factor}
  elif rs.type == "llama3":
    scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
               "high_freq_factor": rs.high_freq_factor,
               "original_max_position_embeddings": rs.original_max_position_embeddings}
  params = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}
  return params, scaling


def model_config_to_hf_config(config: ModelConfig, architecture: str | None = None,
                              dtype: str | None = None) -> dict:
  """A transformers config dict for `config` (v5 `rope_parameters` plus v4's rope_theta / rope_scaling)."""
  arch = architecture or default_architecture(config)
  _check_exportable(config, arch)
  model_type, head = SUPPORTED_ARCHITECTURES[arch]
  common = dict(architectures=[arch], model_type=model_type, vocab_size=config.vocab_size,
                tie_word_embeddings=config.tie_embeddings, pad_token_id=config.pad_token_id,
                bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                initializer_range=0.02, use_cache=True, dtype=dtype or config.param_dtype)
  if head == "score":
    common["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    common["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  if model_type == "gpt2":
    hf = dict(n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.mlp_dim,
              n_positions=config.max_seq_len, activation_function="gelu_new",
              layer_norm_epsilon=config.norm_eps, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
              reorder_and_upcast_attn=False, add_cross_attention=False, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0)
  else:
    rope_parameters, rope_scaling = _rope_to_hf(config)
    hf = dict(hidden_size=config.d_model, intermediate_size=config.mlp_dim, num_hidden_layers=config.n_layers,
              num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads, head_dim=config.hd,
              hidden_act="silu", max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
              rope_parameters=rope_parameters, rope_theta=config.rope_theta, rope_scaling=rope_scaling,
              attention_dropout=0.0)
    if model_type == "llama":
      hf.update(attention_bias=config.o_bias, mlp_bias=config.mlp_bias)
    elif model_type == "mistral":
      hf.update(sliding_window=config.sliding_window)
    else:  # qwen2: all layers sliding (max_window_layers=0) or none
      sliding = config.sliding_window is not None
      hf.update(use_sliding_window=sliding, sliding_window=config.sliding_window,
                max_window_layers=0 if sliding else config.n_layers,
                layer_types=[("sliding_attention" if sliding else "full_attention")] * config.n_layers)
  return {**common, **hf}


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
           ((L, "attn_norm", "scale"), h + "input_layernorm.weight", False),
           ((L, "mlp_norm", "scale"), h + "post_attention_layernorm.weight", False)]
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


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  file: pathlib.Path
  shape: tuple[int, ...]
  dtype: str


def _checkpoint_files(path: pathlib.Path) -> tuple[list[pathlib.Path], pathlib.Path | None]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
    files = sorted({path / f for f in weight_map.values()})
    for f in files:
      if not f.is_file():
        raise CheckpointError(f"{index}: shard {f.name} is listed but missing from {path}")
    return files, index
  single = path / "model.safetensors"
  if single.is_file():
    return [single], None
  found = sorted(path.glob("*.safetensors"))
  if len(found) == 1:
    return found, None
  if found:
    raise CheckpointError(f"{path}: several .safetensors files {[f.name for f in found]} but no "
                          "model.safetensors.index.json")
  other = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack")]
  hint = f" (found {other}: convert them to safetensors with transformers)" if other else ""
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def _read_headers(files: list[pathlib.Path], index: pathlib.Path | None) -> dict[str, _TensorInfo]:
  """name -> (file, shape, dtype), from the safetensors headers only (no tensor data is read)."""
  tensors: dict[str, _TensorInfo] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="np") as handle:
        for name in handle.keys():
          sl = handle.get_slice(name)
          if name in tensors:
            raise CheckpointError(f"{f}: tensor {name} also in {tensors[name].file.name}")
          tensors[name] = _TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
    except CheckpointError:
      raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
  if index is not None:
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, fname in weight_map.items():
      if name not in tensors or tensors[name].file.name != fname:
        where = tensors[name].file.name if name in tensors else "no shard"
        raise CheckpointError(f"{index}: maps tensor {name} to {fname}, but it is in {where}")
  return tensors


class _Reader:
  """Lazily opened safetensors handles; reads slices of (per-layer, transposed) HF tensors."""

  def __init__(self, tensors: dict[str, _TensorInfo]):
    self.tensors = tensors
    self._stack = contextlib.ExitStack()
    self._handles: dict[pathlib.Path, Any] = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stack.close()

  def _handle(self, file: pathlib.Path):
    if file not in self._handles:
      self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="np"))
    return self._handles[file]

  def read(self, name: str, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
    """HF tensor `name` at our `index` (slices into our layout: transposed for nn.Linear weights)."""
    sl = self._handle(self.tensors[name].file).get_slice(name)
    if transpose:
      return np.asarray(sl[index[1], index[0]]).T
    return np.asarray(sl[tuple(index)])


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


def _spec_reader(spec: _Spec, reader: _Reader, shape: tuple[int, ...],
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
          abstract_params: dict) -> tuple[list[_Spec], dict[str, _TensorInfo]]:
  """Every check on the checkpoint's tensors (presence, shape, dtype, nothing unexpected)."""
  files, index = _checkpoint_files(path)
  tensors = _read_headers(files, index)
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
      if info.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; only float tensors "
                              f"{sorted(_FLOAT_DTYPES)} are supported (no quantized checkpoints)")
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
                  seed: int = 0, **config_overrides) -> tuple[Transformer, dict]:
  """Load a transformers checkpoint directory as `(Transformer, params)`.

  Args:
    path: directory with config.json and model.safetensors (or sharded files + index).
    dtype / param_dtype: compute / parameter dtypes (tensors are converted, e.g. bf16 -> float32).
    mesh: place each parameter with its `pro_jax.sharding.param_shardings` NamedSharding, reading only
      each shard's slice; None = the default device, one tensor at a time.
    rules: logical-axis rules (default `pro_jax.sharding.RULES`).
    head: "lm" | "score" | "none"; default the checkpoint's. A score head the checkpoint lacks (e.g.
      a reward model initialised from a causal LM) is initialised N(0, 0.02^2), like `value_head`.
    num_labels: width of the score head (default: the checkpoint's id2label, else 1).
    lora: a LoRAConfig to attach to the model config (the returned params hold only base weights).
    max_seq_len: override max_position_embeddings (GPT-2: at most n_positions; wpe is cut).
    seed: for newly initialised heads.
    config_overrides: further ModelConfig fields (e.g. remat="full", attention_impl="cudnn").

  Returns:
    (model, params) with `model.apply({"params": params}, tokens_BxL, mask_BxL).logits` (or .scores).
  """
  path = pathlib.Path(path)
  hf = read_hf_config(path)
  config, arch = hf_config_to_model_config(
      hf, source=str(path / "config.json"), head=head, num_labels=num_labels, value_head=value_head, lora=lora,
      dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len, **config_overrides)
  model = Transformer(config)
  abstract = abstract_variables(model)["params"]
  specs, tensors = _plan(path, config, arch, hf, abstract)

  shardings = None
  if mesh is not None:
    all_shardings = sh.param_shardings(logical_axes(model), abstract_variables(model), mesh,
                                       sh.RULES if rules is None else rules)
    shardings = flax.traverse_util.flatten_dict(all_shardings["params"])
  flat_abstract = flax.traverse_util.flatten_dict(abstract)
  flat_params = {}
  with _Reader(tensors) as reader:
    for spec in specs:
      leaf = flat_abstract[spec.path]
      shape, leaf_dtype = tuple(leaf.shape), leaf.dtype
      if spec.names:
        read = _spec_reader(spec, reader, shape, leaf_dtype)
      else:
        log.info("%s: no tensor for %s in the checkpoint; initialised N(0, 0.02^2) / zeros", path,
                 "/".join(spec.path))
        full = _new_param(spec.path, shape, leaf_dtype, seed)
        read = lambda idx, full=full: full[idx]  # noqa: E731
      flat_params[spec.path] = _place(shape, leaf_dtype, None if shardings is None else shardings[spec.path], read)
  params = flax.traverse_util.unflatten_dict(flat_params)
  return model, params


# ----------------------------------------------------------------------------------------------
# writing


def _parse_size(size: int | str) -> int:
  """Bytes from 5000000, "5GB" (10^9), "5GiB" (2^30), "200MB", "40KB"... as transformers does."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B)\s*", str(size).upper())
  if not m:
    raise ValueError(f"max_shard_size: cannot parse {size!r} (use e.g. 5GB, 500MB, or an int)")
  value, unit = float(m.group(1)), m.group(2)
  powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
  return int(value * powers[unit])


def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _write_safetensors(file: pathlib.Path, entries: list[tuple[str, tuple[int, ...], np.dtype, Callable]]) -> None:
  """Stream tensors into one safetensors file: header from the shapes, then each tensor's bytes."""
  header: dict[str, Any] = {}
  offset = 0
  for name, shape, dtype, _ in entries:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _ST_DTYPE_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, fetch in entries:
      arr = np.ascontiguousarray(fetch())
      if arr.shape != tuple(shape) or arr.dtype != dtype:
        raise RuntimeError(f"internal: {name} fetched as {arr.shape} {arr.dtype}, planned {shape} {dtype}")
      f.write(arr.tobytes())


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
  if out_dtype is not None and out_dtype not in _ST_DTYPE_CODE:
    raise ValueError(f"dtype {dtype!r}: not a float dtype safetensors can hold")
  model_config_to_hf_config(config, arch)  # refuses configs the class cannot express, before any work
  shard_bytes = _parse_size(max_shard_size)

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
    if dt not in _ST_DTYPE_CODE:
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
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    if writer:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp.mkdir()
      (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
      if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
      fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
      if writer:
        _write_safetensors(tmp / fname, shard)
      else:  # other hosts take part in the gathers only
        for e in shard:
          e[3]()
      weight_map.update({e[0]: fname for e in shard})
    if writer:
      if n > 1:
        total = sum(math.prod(e[1]) * e[2].itemsize for e in entries)
        n_params = sum(math.prod(e[1]) for e in entries)
        index = {"metadata": {"total_size": total, "total_parameters": n_params}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
      _replace_dir(tmp, path)
  except BaseException:
    if writer and tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _replace_dir(tmp: pathlib.Path, path: pathlib.Path) -> None:
  """Move the finished `tmp` to `path`; an old `path` is removed only after the new one is in place."""
  old = None
  if path.exists():
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
  try:
    os.replace(tmp, path)
  except BaseException:
    if old is not None:
      os.replace(old, path)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
