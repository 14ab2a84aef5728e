"""GGUF files (llama.cpp's format) as pro_jax models: `load_gguf(path) -> (model, params, tokenizer)`.

Reading and dequantizing use the `gguf` package (llama.cpp's own Python reader:
`gguf.GGUFReader`, `gguf.quants.dequantize`, vectorized numpy), so every quantization type that
package dequantizes is supported (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ and TQ types,
MXFP4; `supported_quant_types()`). The metadata becomes a transformers config dict
(`gguf_hf_config`) and the tensors are renamed to transformers' names, so the model config and the
params layout come from `pro_jax.models.hf_config` / `hf_io` exactly as for a transformers checkpoint
(`hf_config_to_model_config`, `params_from_hf_tensors`); `save_hf_model` then exports the model as
a transformers checkpoint.

What llama.cpp's converter changed is undone here, as transformers' own GGUF loader does:
* attn_q / attn_k rows (weights and biases) are permuted per head for llama.cpp's interleaved RoPE
  on `llama` files: undone with `permute_rotary` (n_heads for q, n_kv_heads for k). `qwen2` files
  are not permuted by llama.cpp.
* no `output.weight` = tied embeddings.
* RoPE theta, linear RoPE scaling, the RMSNorm epsilon, the context length and the head counts come
  from the `{arch}.*` metadata; head_dim from `{arch}.attention.key_length` (else d / heads).

Architectures: `llama` (Llama 1-3, SmolLM, TinyLlama, and Mistral-7B, which llama.cpp writes as
`llama` and runs with full attention) and `qwen2`. A `rope_freqs` tensor (how llama.cpp stores
Llama 3.1 / 3.2's llama3 RoPE scaling) becomes HF's llama3 rope_scaling when it matches that formula
(llama.cpp applies it; transformers' own GGUF loader ignores the tensor). Not supported (a
`CheckpointError` naming the file and the field): other architectures, mixtures of experts, YaRN /
LongRoPE scaling, other `rope_freqs`, partial rotary dimensions, and tensor types the `gguf` package
cannot dequantize.

The tokenizer is built from the file's metadata by transformers' GGUF tokenizer builders
(`transformers.integrations.gguf`: vocabulary, merges, pre-tokenizer regex, control tokens), with
the chat template, BOS / EOS / UNK / PAD tokens and add_bos flag from the file, as
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` does -- without its torch-based metadata reader.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
from typing import Any

import numpy as np

from pro_jax.models.config import LoRAConfig
from pro_jax.models.hf_config import CheckpointError, hf_config_to_model_config
from pro_jax.models.hf_io import params_from_hf_tensors, permute_rotary
from pro_jax.models.transformer import Transformer

PathLike = str | os.PathLike

# general.architecture -> transformers class
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor name -> transformers name ({i} = layer)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _gguf_module():
  try:
    import gguf
  except ImportError as e:  # pragma: no cover - a declared dependency
    raise ImportError("load_gguf needs the `gguf` package (pip install gguf)") from e
  return gguf


def supported_quant_types() -> list[str]:
  """Names of the GGML tensor types `gguf.quants.dequantize` handles (F32 and F16 are built in)."""
  gguf = _gguf_module()
  traits = getattr(gguf.quants, "_type_traits", {})
  return sorted({"F32", "F16"} | {t.name for t in traits})


@functools.cache
def _reader_class():
  gguf = _gguf_module()

  class _PlainArrayReader(gguf.GGUFReader):
    """`gguf.GGUFReader` over a plain-ndarray view of its memory map.

    The reader slices its `data` once per metadata item (~250k slices for a 49k-token vocabulary);
    on a `np.memmap` every slice pays memmap's `__array_finalize__`, on a plain view of the same
    buffer it does not (3x faster to open, no copy).
    """

    @property
    def data(self) -> np.ndarray:
      return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
      self._plain_data = value.view(np.ndarray)

  return _PlainArrayReader


@dataclasses.dataclass
class GGUFFile:
  """An opened GGUF file: its metadata (python values) and tensors (`gguf.ReaderTensor`, by name)."""

  path: pathlib.Path
  metadata: dict[str, Any]
  tensors: dict[str, Any]

  @property
  def architecture(self) -> str:
    return str(self.field("general.architecture"))

  def field(self, key: str, default: Any = dataclasses.MISSING) -> Any:
    """The metadata value `key`; a `CheckpointError` naming the file and the field when missing."""
    if key in self.metadata:
      return self.metadata[key]
    if default is dataclasses.MISSING:
      raise CheckpointError(f"{self.path}: missing metadata field {key!r}")
    return default

  def number(self, key: str, kind: type = int, default: Any = dataclasses.MISSING) -> Any:
    """`field(key)` as one int / float (per-layer arrays are refused, naming the field)."""
    value = self.field(key, default)
    if isinstance(value, (bool, str, list, tuple)) or value is None:
      if value is None and default is None:
        return None
      raise CheckpointError(f"{self.path}: metadata field {key!r} is {value!r}, expected one number "
                            "(per-layer values are not supported)")
    return kind(value)


def read_gguf(path: PathLike) -> GGUFFile:
  """Open a GGUF file (memory-mapped; no tensor data is read)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such GGUF file")
  try:
    reader = _reader_class()(path)
  except Exception as e:  # noqa: BLE001 - the reader raises ValueError / KeyError / IndexError
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
  metadata = {}
  for key, f in reader.fields.items():
    try:
      metadata[key] = f.contents()
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{path}: metadata field {key!r} cannot be read ({e})") from e
  return GGUFFile(path, metadata, {t.name: t for t in reader.tensors})


# ----------------------------------------------------------------------------------------------
# config


def _unsupported(f: GGUFFile, field: str, what: str) -> CheckpointError:
  return CheckpointError(f"{f.path}: {field}: unsupported {what}")


def gguf_hf_config(f: GGUFFile) -> dict:
  """A transformers config dict for the model in `f` (Llama or Qwen2 CausalLM), from its metadata."""
  arch = f.architecture
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise _unsupported(f, "general.architecture", f"architecture {arch!r} (supported: "
                       f"{sorted(SUPPORTED_GGUF_ARCHITECTURES)})")
  a = arch + "."
  for key in (a + "expert_count", a + "expert_used_count"):
    if f.number(key, int, 0) > 0:
      raise _unsupported(f, key, f"mixture of experts ({key}={f.field(key)})")
  n_heads = f.number(a + "attention.head_count")
  d = f.number(a + "embedding_length")
  n_kv = f.number(a + "attention.head_count_kv", int, n_heads)
  head_dim = f.number(a + "attention.key_length", int, d // n_heads if n_heads and d % n_heads == 0 else 0)
  if head_dim <= 0:
    raise CheckpointError(f"{f.path}: missing metadata field {a + 'attention.key_length'!r} "
                          f"({a}embedding_length={d} is not a multiple of {a}attention.head_count={n_heads})")
  value_dim = f.number(a + "attention.value_length", int, head_dim)
  if value_dim != head_dim:
    raise _unsupported(f, a + "attention.value_length", f"value_length {value_dim} != key_length {head_dim}")
  rot = f.number(a + "rope.dimension_count", int, head_dim)
  if rot != head_dim:
    raise _unsupported(f, a + "rope.dimension_count", f"partial rotary embedding ({rot} of {head_dim} dims)")
  theta = f.number(a + "rope.freq_base", float, 10000.0)
  rope_type = str(f.field(a + "rope.scaling.type", "none"))
  rope_scaling = None
  if rope_type == "linear":
    rope_scaling = {"rope_type": "linear", "factor": f.number(a + "rope.scaling.factor", float)}
  elif rope_type != "none":
    raise _unsupported(f, a + "rope.scaling.type", f"RoPE scaling {rope_type!r} (supported: none, linear)")
  if "rope_freqs.weight" in f.tensors:
    if rope_scaling is not None:
      raise _unsupported(f, "rope_freqs.weight", f"RoPE frequency factors together with {rope_type} scaling")
    rope_scaling = _llama3_rope_from_factors(f, theta, head_dim)
  vocab = f.number(a + "vocab_size", int, None)
  if vocab is None:
    if "token_embd.weight" not in f.tensors:
      raise CheckpointError(f"{f.path}: missing tensor 'token_embd.weight'")
    vocab = _hf_shape(f, "token_embd.weight")[0]
  names = set(f.tensors)
  hf = dict(
      architectures=[SUPPORTED_GGUF_ARCHITECTURES[arch]], model_type=arch, vocab_size=int(vocab), hidden_size=d,
      intermediate_size=f.number(a + "feed_forward_length"), num_hidden_layers=f.number(a + "block_count"),
      num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
      max_position_embeddings=f.number(a + "context_length"),
      rms_norm_eps=f.number(a + "attention.layer_norm_rms_epsilon", float),
      rope_theta=theta, rope_scaling=rope_scaling, hidden_act="silu",
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=f.field("tokenizer.ggml.bos_token_id", None),
      eos_token_id=f.field("tokenizer.ggml.eos_token_id", None),
      pad_token_id=f.field("tokenizer.ggml.padding_token_id", None))
  if arch == "llama":
    hf.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_gate.bias" in names)
  else:
    hf.update(use_sliding_window=False)
  return hf


# Llama 3.1 / 3.2's rope_scaling values besides `factor` (their config.json files all use these)
_LLAMA3_ROPE_CANDIDATES = (
    {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},)


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
  """llama.cpp's `rope_freqs` [head_dim / 2] for HF's llama3 RoPE scaling: each base frequency is
  divided by its entry (1 for short wavelengths, `factor` for long ones, interpolated between), as
  llama.cpp's convert_hf_to_gguf computes it."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / freqs
  low_wavelen = original_max_position_embeddings / low_freq_factor
  high_wavelen = original_max_position_embeddings / high_freq_factor
  smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  mid = 1.0 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))


def _llama3_rope_from_factors(f: GGUFFile, theta: float, head_dim: int) -> dict:
  """HF llama3 rope_scaling from a `rope_freqs` tensor, when it is one (llama.cpp writes Llama 3.1's
  scaling only as these per-frequency factors; `factor` is their maximum, the rest is matched
  against Llama 3.1 / 3.2's values)."""
  t = f.tensors["rope_freqs.weight"]
  got = np.asarray(_gguf_module().quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
  if got.shape != (head_dim // 2,):
    raise _unsupported(f, "rope_freqs.weight", f"shape {list(got.shape)} (expected [{head_dim // 2}])")
  factor = float(got.max())
  for cand in _LLAMA3_ROPE_CANDIDATES:
    if np.allclose(got, llama3_rope_factors(theta, head_dim, factor, **cand), rtol=1e-5, atol=1e-6):
      return {"rope_type": "llama3", "factor": factor, **cand}
  raise _unsupported(f, "rope_freqs.weight", "RoPE frequency factors that are not Llama 3.1-style llama3 scaling "
                     f"(factor {factor:g} with {_LLAMA3_ROPE_CANDIDATES})")


# ----------------------------------------------------------------------------------------------
# tensors


def _hf_shape(f: GGUFFile, name: str) -> tuple[int, ...]:
  """transformers' shape of a GGUF tensor (GGUF lists dimensions innermost first)."""
  return tuple(int(n) for n in reversed(f.tensors[name].shape))


def hf_tensor_name(gguf_name: str) -> str | None:
  """The transformers name of a GGUF tensor name (Llama-family), None if it has none."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER_RE.fullmatch(gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
  return None


class _GGUFTensors:
  """GGUF tensors by transformers name, dequantized to float32 on demand (the
  `params_from_hf_tensors` source interface): the decoded tensors of one parameter are cached
  until `release()`."""

  def __init__(self, f: GGUFFile, hf: dict):
    gguf = _gguf_module()
    self.file = f
    self._dequantize = gguf.quants.dequantize
    supported = set(supported_quant_types())
    self.gguf_names: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for name, t in f.tensors.items():
      if name == "rope_freqs.weight":  # RoPE scaling, read into the config by gguf_hf_config
        continue
      hf_name = hf_tensor_name(name)
      if hf_name is None:
        raise CheckpointError(f"{f.path}: unexpected tensor {name!r} (shape {list(_hf_shape(f, name))}) for "
                              f"architecture {f.architecture!r}")
      if t.tensor_type.name not in supported:
        raise _unsupported(f, f"tensor {name!r}", f"type {t.tensor_type.name} (the gguf package dequantizes "
                           f"{', '.join(supported_quant_types())})")
      self.gguf_names[hf_name] = name
      self.shapes[hf_name] = _hf_shape(f, name)
    # llama.cpp permutes q / k rows of `llama` files for its interleaved RoPE
    self._rotary_heads: dict[str, int] = {}
    if f.architecture == "llama":
      self._rotary_heads = {".self_attn.q_proj.": int(hf["num_attention_heads"]),
                            ".self_attn.k_proj.": int(hf["num_key_value_heads"])}
    self._cache: dict[str, np.ndarray] = {}

  def full(self, name: str) -> np.ndarray:
    """Tensor `name` (transformers name and layout), float32."""
    if name not in self._cache:
      t = self.file.tensors[self.gguf_names[name]]
      try:
        arr = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shapes[name])
      except Exception as e:  # noqa: BLE001 - malformed block data
        raise CheckpointError(f"{self.file.path}: tensor {t.name!r} ({t.tensor_type.name}) cannot be "
                              f"dequantized ({type(e).__name__}: {e})") from e
      for key, heads in self._rotary_heads.items():
        if key in name:
          arr = permute_rotary(arr, heads)
      self._cache[name] = arr
    return self._cache[name]

  def read(self, name: str, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
    full = self.full(name)
    if transpose:
      return full[index[1], index[0]].T
    return full[tuple(index)]

  def release(self) -> None:
    self._cache.clear()


# ----------------------------------------------------------------------------------------------
# tokenizer


def gguf_tokenizer(f: GGUFFile | PathLike) -> Any:
  """A transformers tokenizer from the GGUF metadata, with the file's chat template and special tokens.

  Same construction as `AutoTokenizer.from_pretrained(dir, gguf_file=name)` in transformers 5
  (its `get_gguf_tokenizer` + `convert_gguf_tokenizer`), from metadata read by the `gguf` package
  (transformers' own GGUF metadata reader needs torch). The result is a `TokenizersBackend` with
  `pad_token` set (the file's padding token, else EOS).
  """
  if not isinstance(f, GGUFFile):
    f = read_gguf(f)
  try:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                        convert_gguf_tokenizer)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
  except ImportError as e:
    raise ImportError("building a tokenizer from a GGUF file needs transformers 5.24 or newer "
                      "(transformers.integrations.gguf)") from e
  md = f.metadata
  if "tokenizer.ggml.tokens" not in md:
    raise CheckpointError(f"{f.path}: missing metadata field 'tokenizer.ggml.tokens' (no tokenizer in the file)")
  grouped = {group: {name: md[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in md}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
  tokenizer_type = tokenizer_dict.get("tokenizer_type")
  if tokenizer_type == "llama":  # as transformers: llama.cpp adds BOS to such vocabularies unless told not to
    tokenizer_config.setdefault("add_bos_token", True)
  elif tokenizer_type == "gemma4":
    tokenizer_config["add_bos_token"] = False
  tokens = tokenizer_dict["tokens"]
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = md.get(f"tokenizer.ggml.{key}")
    if token_id is not None and not 0 <= int(token_id) < len(tokens):
      raise CheckpointError(f"{f.path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary "
                            f"[0, {len(tokens)})")
    tokenizer_config[name] = tokens[int(token_id)] if token_id is not None else None
  try:
    backend, extra = convert_gguf_tokenizer(f.architecture, tokenizer_dict)
  except ValueError as e:
    raise _unsupported(f, "tokenizer.ggml.model", f"tokenizer ({e})") from e
  tok = TokenizersBackend(tokenizer_object=backend, **{**tokenizer_config, **extra})
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  return tok


# ----------------------------------------------------------------------------------------------
# loading


def load_gguf(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32", mesh: Any = None,
              rules: Any = None, head: str | None = None, num_labels: int | None = None, value_head: bool = False,
              lora: LoRAConfig | None = None, max_seq_len: int | None = None, seed: int = 0,
              tokenizer: bool = True, **config_overrides) -> tuple[Transformer, dict, Any]:
  """Load a GGUF file (Llama / Qwen2) as `(model, params, tokenizer)`, weights dequantized.

  Args:
    path: the .gguf file.
    dtype / param_dtype: compute / parameter dtypes (weights are dequantized to float32, then cast).
    mesh: place each parameter with its `pro_jax.sharding.param_shardings` NamedSharding (as
      `load_hf_model` does); None = the default device.
    rules: logical-axis rules (default `pro_jax.sharding.RULES`).
    head: "lm" (default) | "score" | "none"; a score head is initialised N(0, 0.02^2) with
      `num_labels` outputs (reward-model backbone).
    value_head, lora, max_seq_len, seed, config_overrides: as in `load_hf_model`.
    tokenizer: build the tokenizer (`gguf_tokenizer`); False returns None in its place.

  Returns:
    (model, params, tokenizer): `model.apply({"params": params}, tokens_BxL, mask_BxL).logits`;
    the tokenizer's `apply_chat_template` uses the file's `tokenizer.chat_template`.

  Raises:
    CheckpointError naming the file and the field for an unsupported architecture, tensor type or
    setting, or a missing metadata field -- before any tensor is dequantized.
  """
  f = read_gguf(path)
  hf = gguf_hf_config(f)
  config, _ = hf_config_to_model_config(
      hf, source=str(f.path), head=head, num_labels=num_labels, value_head=value_head, lora=lora, dtype=dtype,
      param_dtype=param_dtype, max_seq_len=max_seq_len, **config_overrides)
  source = _GGUFTensors(f, hf)
  tok = gguf_tokenizer(f) if tokenizer else None
  model = Transformer(config)
  params = params_from_hf_tensors(model, source, where=str(f.path), mesh=mesh, rules=rules, seed=seed)
  return model, params, tok
