"""Hugging Face `config.json` <-> `ModelConfig`: the per-architecture translation of transformers'
config fields (RoPE variants, sliding-window layouts, Gemma options, GPT-2's names) in both directions.

`hf_config_to_model_config` refuses (CheckpointError naming the file and field) any option pro_jax
would not reproduce exactly; `model_config_to_hf_config` refuses a `ModelConfig` the chosen
transformers class cannot express. The tensors of a checkpoint are `pro_jax.models.hf_io`'s concern;
`SUPPORTED_ARCHITECTURES` lists the classes both modules handle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any

from pro_jax.models.config import LoRAConfig, ModelConfig, RopeScaling

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
    "Qwen3ForCausalLM": ("qwen3", "lm"),
    "Qwen3ForSequenceClassification": ("qwen3", "score"),
    "Gemma2ForCausalLM": ("gemma2", "lm"),
    "Gemma2ForSequenceClassification": ("gemma2", "score"),
    "Gemma3ForCausalLM": ("gemma3_text", "lm"),
    "Gemma3TextForSequenceClassification": ("gemma3_text", "score"),
}
_CAUSAL_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen3": "Qwen3ForCausalLM",
                         "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_GEMMA = ("gemma2", "gemma3_text")
# transformers' class defaults for fields a config.json may omit (save_pretrained writes them all).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=128, tie_word_embeddings=False, max_position_embeddings=32768),
    "gemma2": dict(head_dim=256, tie_word_embeddings=True, max_position_embeddings=8192, query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
    "gemma3_text": dict(head_dim=256, tie_word_embeddings=True, max_position_embeddings=131072,
                        query_pre_attn_scalar=256, attn_logit_softcapping=None, final_logit_softcapping=None,
                        sliding_window=4096),
}
_GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")  # both are tanh-approximate GELU
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are tanh-approximate GELU


class CheckpointError(ValueError):
  """A checkpoint (or config) that cannot be loaded or saved; the message names the file and tensor."""


def read_json_object(path: PathLike, name: str, kind: str) -> dict:
  """The JSON object in file `name` of directory `path` (`kind` of directory, for the error message:
  e.g. "a transformers checkpoint"); CheckpointError naming the file when it is missing, not JSON or
  not an object."""
  file = pathlib.Path(path) / name
  if not file.is_file():
    raise CheckpointError(f"{file}: not found (is {path} {kind} directory?)")
  try:
    obj = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: invalid JSON ({e})") from e
  if not isinstance(obj, dict):
    raise CheckpointError(f"{file}: expected a JSON object")
  return obj


def read_hf_config(path: PathLike) -> dict:
  """The parsed config.json of a checkpoint directory."""
  return read_json_object(path, "config.json", "a transformers checkpoint")


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


def _gemma_layers_from_hf(hf: dict, model_type: str, source: str) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, layer_types) of Gemma 2 (default: every other layer sliding, starting with the
  first) and Gemma 3 (default: `sliding_window_pattern` (6): five sliding layers, then a global one);
  uniform layers come back as layer_types=None."""
  n_layers = int(_field(hf, "num_hidden_layers", source))
  window = hf.get("sliding_window", _HF_DEFAULTS[model_type]["sliding_window"])
  pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
  layer_types = hf.get("layer_types") or [
      "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
  if len(layer_types) != n_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
    raise _unsupported(source, f"layer_types {layer_types} (expected {n_layers} of full_attention / sliding_attention)")
  kinds = set(layer_types)
  if "sliding_attention" not in kinds:
    return None, None
  if window is None:
    raise CheckpointError(f"{source}: sliding_attention layers but no sliding_window")
  return int(window), (None if len(kinds) == 1 else tuple(layer_types))


def _gemma3_rope_from_hf(hf: dict, source: str) -> tuple[float, RopeScaling, float]:
  """Global theta and scaling, and the local (sliding layers') theta of Gemma 3: v5 per-layer-type
  `rope_parameters` {"full_attention": {...}, "sliding_attention": {...}} or v4's `rope_theta`,
  `rope_scaling` (global layers) and `rope_local_base_freq`."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
    unknown = sorted(set(params) - {"full_attention", "sliding_attention"})
    if unknown:
      raise _unsupported(source, f"rope_parameters for layer types {unknown}")
    full = dict(params.get("full_attention") or {})
    if hf.get("rope_scaling"):  # as transformers: rope_scaling updates the global layers' parameters
      full.update(hf["rope_scaling"])
    full.setdefault("rope_theta", hf.get("rope_theta") or 1_000_000.0)
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 10_000.0)
  else:
    full = dict(hf.get("rope_scaling") or params or {})
    full.setdefault("rope_theta", hf.get("rope_theta") or 1_000_000.0)
    local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq") or 10_000.0}
  theta, scaling = _rope_from_hf({"rope_parameters": full, "max_position_embeddings": hf.get("max_position_embeddings"),
                                  "partial_rotary_factor": hf.get("partial_rotary_factor")}, source)
  local_type = local.get("rope_type", local.get("type", "default"))
  if local_type != "default" or float(local.get("partial_rotary_factor", 1.0)) != 1.0:
    raise _unsupported(source, f"sliding_attention rope_parameters {local} (only the default RoPE for local layers)")
  return theta, scaling, float(local["rope_theta"])


def _sliding_window_from_hf(hf: dict, model_type: str, source: str) -> int | None:
  n_layers = int(_field(hf, "num_hidden_layers", source))
  if model_type == "llama":
    return None
  if model_type in ("qwen2", "qwen3"):
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


_GPT2_INT_FIELDS = {"n_embd": True, "n_head": True, "n_layer": True, "n_positions": True, "vocab_size": True,
                    "n_inner": False}  # field -> required
_LLAMA_INT_FIELDS = {"hidden_size": True, "num_attention_heads": True, "num_hidden_layers": True,
                     "intermediate_size": True, "vocab_size": True, "num_key_value_heads": False, "head_dim": False,
                     "max_position_embeddings": False}
_POSITIVE_FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")


def _validate_config(hf: dict, model_type: str, source: str) -> None:
  """CheckpointError naming `source` and the field for a size that is not a positive integer (a
  string, 0, a float) or an epsilon / rope theta that is not a positive finite number; before any
  arithmetic on them (a 0 head count used to be a ZeroDivisionError)."""
  fields = _GPT2_INT_FIELDS if model_type == "gpt2" else _LLAMA_INT_FIELDS
  for key, required in fields.items():
    value = hf.get(key)
    if value is None:
      if required:
        raise CheckpointError(f"{source}: missing field {key!r}")
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise CheckpointError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
  for key in _POSITIVE_FLOAT_FIELDS:
    value = hf.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
      raise CheckpointError(f"{source}: field {key!r} must be a positive finite number, got {value!r}")



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
  _validate_config(hf, model_type, source)
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
    defaults = _HF_DEFAULTS.get(model_type, {})
    gemma = model_type in _GEMMA
    if gemma:
      act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
      if act not in _GEMMA_ACTIVATIONS:
        raise _unsupported(source, f"hidden_activation {act!r} (supported: {_GEMMA_ACTIVATIONS})")
      if hf.get("use_bidirectional_attention"):
        raise _unsupported(source, "use_bidirectional_attention=true (pro_jax decoders are causal)")
    else:
      act = hf.get("hidden_act", "silu")
      if act != "silu":
        raise _unsupported(source, f"hidden_act {act!r} (only silu / SwiGLU)")
    local_theta = None
    if model_type == "gemma3_text":
      theta, scaling, local_theta = _gemma3_rope_from_hf(hf, source)
    else:
      theta, scaling = _rope_from_hf(hf, source)
    d, n_heads = int(_field(hf, "hidden_size", source)), int(_field(hf, "num_attention_heads", source))
    head_dim = hf.get("head_dim", defaults.get("head_dim"))
    head_dim = None if head_dim is None or (d % n_heads == 0 and int(head_dim) == d // n_heads) else int(head_dim)
    if model_type in ("llama", "qwen3") or gemma:
      qkv_bias = o_bias = bool(hf.get("attention_bias", False))
      mlp_bias = bool(hf.get("mlp_bias", False)) if model_type == "llama" else False
    else:
      qkv_bias, o_bias, mlp_bias = model_type == "qwen2", False, False
    if gemma:
      window, layer_types = _gemma_layers_from_hf(hf, model_type, source)
    else:
      window, layer_types = _sliding_window_from_hf(hf, model_type, source), None
    kw = dict(arch="llama", vocab_size=int(_field(hf, "vocab_size", source)), d_model=d,
              n_layers=int(_field(hf, "num_hidden_layers", source)), n_heads=n_heads,
              n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), head_dim=head_dim,
              mlp_dim=int(_field(hf, "intermediate_size", source)),
              max_seq_len=max_seq_len or int(hf.get("max_position_embeddings")
                                             or defaults.get("max_position_embeddings", 2048)),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
              qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=window,
              tie_embeddings=bool(hf.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
              qk_norm=model_type in ("qwen3", "gemma3_text"))
    if gemma:
      def opt_float(key):
        value = hf.get(key, defaults[key])
        return None if value is None else float(value)

      if model_type == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        log.warning("%s: attn_logit_softcapping=%s is ignored, as transformers' Gemma 3 ignores it", source,
                    hf["attn_logit_softcapping"])
      kw.update(norm_offset=1.0, scale_embeddings=True, mlp_act="gelu_tanh", sandwich_norms=True,
                query_pre_attn_scalar=opt_float("query_pre_attn_scalar"),
                attn_logit_softcap=opt_float("attn_logit_softcapping") if model_type == "gemma2" else None,
                final_logit_softcap=opt_float("final_logit_softcapping"),
                layer_types=layer_types, local_rope_theta=local_theta)
  try:
    config = ModelConfig(**{**kw, **common, **overrides})
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: {e}") from e
  return config, arch


def default_architecture(config: ModelConfig) -> str:
  """The transformers class an export of `config` uses unless told otherwise."""
  if config.arch == "gpt2":
    return "GPT2ForSequenceClassification" if config.head == "score" else "GPT2LMHeadModel"
  if config.sandwich_norms or config.norm_offset:
    if config.qk_norm:
      return "Gemma3TextForSequenceClassification" if config.head == "score" else "Gemma3ForCausalLM"
    family = "Gemma2"
  elif config.qk_norm:
    family = "Qwen3"
  elif config.qkv_bias and not config.o_bias:
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
  gemma = model_type in _GEMMA
  if config.arch == "llama":
    gemma_opts = dict(norm_offset=config.norm_offset == 1.0, scale_embeddings=config.scale_embeddings,
                      mlp_act=config.mlp_act == "gelu_tanh", sandwich_norms=config.sandwich_norms)
    for name, is_gemma in gemma_opts.items():
      if is_gemma != gemma:
        problems.append(f"{name}={getattr(config, name)!r} ({'required' if gemma else 'not supported'} by {arch})")
    if config.norm_offset not in (0.0, 1.0):
      problems.append(f"norm_offset={config.norm_offset}")
    if config.qk_norm != (model_type in ("qwen3", "gemma3_text")):
      problems.append(f"qk_norm={config.qk_norm}")
    if not gemma:
      for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "local_rope_theta"):
        if getattr(config, name) is not None:
          problems.append(f"{name} (a Gemma option)")
    if model_type != "gemma3_text" and config.local_rope_theta is not None:
      problems.append("local_rope_theta (Gemma 3 only)")
    qpas = config.query_pre_attn_scalar
    if gemma and qpas is not None and float(qpas) != int(qpas):
      problems.append(f"query_pre_attn_scalar={qpas} (transformers requires an integer)")
    if model_type == "gemma3_text" and config.attn_logit_softcap is not None:
      problems.append("attn_logit_softcap (transformers' Gemma 3 ignores attn_logit_softcapping)")
    if not gemma and config.mixed_layers:
      problems.append("mixed full / sliding layers (layer_types; Gemma 2 / 3 only)")
    if (model_type in ("qwen3",) or gemma) and config.mlp_bias:
      problems.append("mlp_bias")
    if (model_type in ("qwen3",) or gemma) and config.qkv_bias != config.o_bias:
      problems.append(f"qkv_bias != o_bias ({arch}'s attention_bias covers q, k, v and o)")
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
    if model_type in _GEMMA:
      del hf["hidden_act"]
      sliding = config.sliding_layers
      hf.update(hidden_activation="gelu_pytorch_tanh", attention_bias=config.o_bias,
                query_pre_attn_scalar=int(config.query_pre_attn_scalar or config.hd),  # an int in transformers
                final_logit_softcapping=config.final_logit_softcap,
                sliding_window=config.sliding_window if any(sliding) else None,
                layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
                use_bidirectional_attention=False)
      if model_type == "gemma2":
        hf.update(attn_logit_softcapping=config.attn_logit_softcap)
      else:  # per-layer-type RoPE; v4's rope_theta / rope_scaling / rope_local_base_freq too
        local_theta = config.local_rope_theta if config.local_rope_theta is not None else config.rope_theta
        if config.local_rope_theta is None and config.rope_scaling.type != "default":
          raise CheckpointError(f"the model cannot be written as {arch}: sliding layers would use the scaled "
                                "global RoPE (set local_rope_theta)")
        hf.update(rope_parameters={"full_attention": rope_parameters,
                                   "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
                  rope_local_base_freq=local_theta, attn_logit_softcapping=None)
    elif model_type == "llama":
      hf.update(attention_bias=config.o_bias, mlp_bias=config.mlp_bias)
    elif model_type == "mistral":
      hf.update(sliding_window=config.sliding_window)
    else:  # qwen2 / qwen3: all layers sliding (max_window_layers=0) or none
      sliding = config.sliding_window is not None
      hf.update(use_sliding_window=sliding, sliding_window=config.sliding_window,
                max_window_layers=0 if sliding else config.n_layers,
                layer_types=[("sliding_attention" if sliding else "full_attention")] * config.n_layers)
      if model_type == "qwen3":
        hf.update(attention_bias=config.o_bias)
  return {**common, **hf}

