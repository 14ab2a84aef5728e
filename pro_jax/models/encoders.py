"""Encoder sequence classifiers in Flax Linen: DistilBERT and BART, as transformers defines them.

These are the paper's non-decoder scorers (docs/experiments.md): the Helpful Assistant humor model
(`mohameddhiab/humor-no-humor`, `DistilBertForSequenceClassification`) and the Reddit Summary
faithfulness model (`CogComp/bart-faithful-summary-detector`, `BartForSequenceClassification`).
They are only ever scored with (no generation, no training here), so they live apart from the
decoder `Transformer`: no KV cache, LoRA, sharding rules or scanned layers, unrolled layers, and a
parameter tree whose paths are transformers' tensor names (`layer_0` for `layer.0`, `kernel` =
the transposed nn.Linear `weight`, `scale` for a LayerNorm `weight`, `embedding` for an nn.Embedding's).

    model, params = load_encoder_classifier("ckpts/humor-no-humor")      # or pro_jax.load_hf_model
    scores_BxC = model.apply({"params": params}, tokens_BxL, mask_BxL).scores   # float32 logits

* DistilBERT: word + learned position embeddings (positions 0..L-1), LayerNorm (eps 1e-12); post-LN
  blocks (attention -> add -> LayerNorm, FFN lin1 -> activation -> lin2 -> add -> LayerNorm);
  `pre_classifier` -> ReLU -> `classifier` on the hidden state of the first token ([CLS]).
* BART: a shared token embedding (x sqrt(d_model) when `scale_embedding`), learned positions with
  offset 2, `layernorm_embedding`, post-LN encoder and decoder layers (eps 1e-5). The decoder reads
  the input shifted right (`decoder_start_token_id` first) with a causal mask only, as transformers
  does when no decoder mask is given, and cross-attends to the encoder's real tokens; the
  classification head (dense -> tanh -> out_proj) reads the decoder state at the row's last EOS.
  transformers requires every row to hold the same number of EOS tokens and reads the last one
  whatever the attention mask says; here each row's last EOS with mask 1 is read (the last real token
  when a row has none), which agrees whenever padding is not EOS.

Positions are absolute (0..L-1, not counted from the mask), as in transformers: left-padded rows see
the same numbers as transformers gives them, but their scores differ from an unpadded call.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.models import hf_io, safetensors_io
from pro_jax.models.config import LoRAConfig
from pro_jax.models.hf_io import CheckpointError
from pro_jax.models.transformer import ModelOutput

PathLike = str | os.PathLike
Array = jax.Array

ENCODER_ARCHITECTURES = {"DistilBertForSequenceClassification": "distilbert",
                         "BartForSequenceClassification": "bart"}
ENCODER_MODEL_TYPES = frozenset(ENCODER_ARCHITECTURES.values())
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' GELUActivation (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """An encoder classifier's shape. Fields shared with `ModelConfig` (head, num_labels, arch,
  max_seq_len, dtype, pad / eos ids) mean the same, so scorer code can read either."""

  arch: str  # "distilbert" | "bart"
  vocab_size: int
  d_model: int
  n_layers: int  # encoder layers
  n_heads: int
  mlp_dim: int
  max_seq_len: int  # learned positions: inputs may not be longer
  num_labels: int
  activation: str = "gelu"
  norm_eps: float = 1e-12
  decoder_layers: int = 0  # BART only
  decoder_heads: int = 0
  decoder_mlp_dim: int = 0
  scale_embedding: bool = False
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  decoder_start_token_id: int | None = None
  labels: tuple[str, ...] = ()  # id2label in index order
  dtype: str = "float32"
  param_dtype: str = "float32"
  head: str = "score"  # always: only sequence classifiers are supported

  def __post_init__(self):
    if self.arch not in ENCODER_MODEL_TYPES:
      raise ValueError(f"arch must be one of {sorted(ENCODER_MODEL_TYPES)}, got {self.arch!r}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation {self.activation!r} is not supported ({sorted(_ACTIVATIONS)})")
    heads = [(self.d_model, self.n_heads)] + ([(self.d_model, self.decoder_heads)] if self.arch == "bart" else [])
    for d, h in heads:
      if h <= 0 or d % h:
        raise ValueError(f"d_model={d} is not divisible by {h} attention heads")
    if self.arch == "bart" and (self.decoder_layers <= 0 or self.eos_token_id is None
                                or self.decoder_start_token_id is None):
      raise ValueError("BART needs decoder_layers > 0, eos_token_id and decoder_start_token_id")
    if self.labels and len(self.labels) != self.num_labels:
      raise ValueError(f"{len(self.labels)} label names for num_labels={self.num_labels}")

  def label_index(self, label: int | str) -> int:
    """The column of `label` (an index, or a name from id2label, case-insensitive)."""
    if isinstance(label, (int, np.integer)):
      if not 0 <= int(label) < self.num_labels:
        raise ValueError(f"label index {label} out of range for num_labels={self.num_labels}")
      return int(label)
    names = [n.lower() for n in self.labels]
    if str(label).lower() not in names:
      raise ValueError(f"label {label!r} is not one of the model's labels {list(self.labels)}")
    return names.index(str(label).lower())


# ----------------------------------------------------------------------------------------------
# layers


def _dense(cfg: EncoderConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name)


def _layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
  # statistics in float32, like torch's LayerNorm on float32 inputs
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype), name=name)


class _Attention(nn.Module):
  """Multi-head attention with biases; `names` are transformers' (q, k, v, out) projection names."""

  cfg: EncoderConfig
  n_heads: int
  names: tuple[str, str, str, str]

  @nn.compact
  def __call__(self, x_BxQxD: Array, kv_BxKxD: Array, allowed_BxQxK: Array) -> Array:
    cfg, H = self.cfg, self.n_heads
    D = x_BxQxD.shape[-1]
    hd = D // H
    q_BxQxHxE = _dense(cfg, D, self.names[0])(x_BxQxD).reshape(*x_BxQxD.shape[:2], H, hd)
    k_BxKxHxE = _dense(cfg, D, self.names[1])(kv_BxKxD).reshape(*kv_BxKxD.shape[:2], H, hd)
    v_BxKxHxE = _dense(cfg, D, self.names[2])(kv_BxKxD).reshape(*kv_BxKxD.shape[:2], H, hd)
    logits_BxHxQxK = jnp.einsum("bqhe,bkhe->bhqk", q_BxQxHxE, k_BxKxHxE).astype(jnp.float32) / math.sqrt(hd)
    logits_BxHxQxK = jnp.where(allowed_BxQxK[:, None], logits_BxHxQxK, jnp.finfo(jnp.float32).min)
    probs_BxHxQxK = jax.nn.softmax(logits_BxHxQxK, axis=-1).astype(v_BxKxHxE.dtype)
    out_BxQxHxE = jnp.einsum("bhqk,bkhe->bqhe", probs_BxHxQxK, v_BxKxHxE)
    return _dense(cfg, D, self.names[3])(out_BxQxHxE.reshape(x_BxQxD.shape))


def _act(cfg: EncoderConfig, x: Array) -> Array:
  return _ACTIVATIONS[cfg.activation](x)


def _embed(cfg: EncoderConfig, n: int, name: str) -> nn.Embed:
  return nn.Embed(n, cfg.d_model, param_dtype=jnp.dtype(cfg.param_dtype), name=name)


# ---------------------------------------------------------------------------------------- DistilBERT


class _DistilBertEmbeddings(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, tokens_BxL: Array) -> Array:
    cfg = self.cfg
    L = tokens_BxL.shape[1]
    x_BxLxD = _embed(cfg, cfg.vocab_size, "word_embeddings")(tokens_BxL)
    x_BxLxD = x_BxLxD + _embed(cfg, cfg.max_seq_len, "position_embeddings")(jnp.arange(L)[None])
    return _layer_norm(cfg, "LayerNorm")(x_BxLxD).astype(jnp.dtype(cfg.dtype))


class _FFN(nn.Module):
  cfg: EncoderConfig
  hidden: int
  names: tuple[str, str]

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    h_BxLxF = _act(self.cfg, _dense(self.cfg, self.hidden, self.names[0])(x_BxLxD))
    return _dense(self.cfg, x_BxLxD.shape[-1], self.names[1])(h_BxLxF)


class _DistilBertBlock(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array, allowed_BxLxL: Array) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    a_BxLxD = _Attention(cfg, cfg.n_heads, ("q_lin", "k_lin", "v_lin", "out_lin"), name="attention")(
        x_BxLxD, x_BxLxD, allowed_BxLxL)
    x_BxLxD = _layer_norm(cfg, "sa_layer_norm")(a_BxLxD + x_BxLxD).astype(dt)
    f_BxLxD = _FFN(cfg, cfg.mlp_dim, ("lin1", "lin2"), name="ffn")(x_BxLxD)
    return _layer_norm(cfg, "output_layer_norm")(f_BxLxD + x_BxLxD).astype(dt)


class _DistilBertLayers(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array, allowed_BxLxL: Array) -> Array:
    for i in range(self.cfg.n_layers):
      x_BxLxD = _DistilBertBlock(self.cfg, name=f"layer_{i}")(x_BxLxD, allowed_BxLxL)
    return x_BxLxD


class _DistilBertModel(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, tokens_BxL: Array, mask_BxL: Array) -> Array:
    x_BxLxD = _DistilBertEmbeddings(self.cfg, name="embeddings")(tokens_BxL)
    allowed_BxLxL = jnp.broadcast_to(mask_BxL.astype(bool)[:, None, :], (*tokens_BxL.shape, tokens_BxL.shape[1]))
    return _DistilBertLayers(self.cfg, name="transformer")(x_BxLxD, allowed_BxLxL)


# ---------------------------------------------------------------------------------------------- BART


class _BartLayer(nn.Module):
  """An encoder layer, or a decoder layer when `cross` (self-attention, cross-attention, FFN; post-LN)."""

  cfg: EncoderConfig
  n_heads: int
  mlp_dim: int
  cross: bool

  @nn.compact
  def __call__(self, x_BxLxD: Array, allowed_BxLxL: Array, enc_BxSxD: Array | None = None,
               cross_allowed_BxLxS: Array | None = None) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    proj = ("q_proj", "k_proj", "v_proj", "out_proj")
    a_BxLxD = _Attention(cfg, self.n_heads, proj, name="self_attn")(x_BxLxD, x_BxLxD, allowed_BxLxL)
    x_BxLxD = _layer_norm(cfg, "self_attn_layer_norm")(x_BxLxD + a_BxLxD).astype(dt)
    if self.cross:
      c_BxLxD = _Attention(cfg, self.n_heads, proj, name="encoder_attn")(x_BxLxD, enc_BxSxD, cross_allowed_BxLxS)
      x_BxLxD = _layer_norm(cfg, "encoder_attn_layer_norm")(x_BxLxD + c_BxLxD).astype(dt)
    h_BxLxF = _act(cfg, _dense(cfg, self.mlp_dim, "fc1")(x_BxLxD))
    f_BxLxD = _dense(cfg, cfg.d_model, "fc2")(h_BxLxF)
    return _layer_norm(cfg, "final_layer_norm")(x_BxLxD + f_BxLxD).astype(dt)


class _BartStack(nn.Module):
  """transformers' `BartEncoder` / `BartDecoder` on already-embedded tokens (the shared embedding
  lives one level up): + learned positions (offset 2), layernorm_embedding, `layers_{i}`."""

  cfg: EncoderConfig
  decoder: bool

  @nn.compact
  def __call__(self, x_BxLxD: Array, allowed_BxLxL: Array, enc_BxSxD: Array | None = None,
               cross_allowed_BxLxS: Array | None = None) -> Array:
    cfg = self.cfg
    L = x_BxLxD.shape[1]
    pos_1xLxD = _embed(cfg, cfg.max_seq_len + 2, "embed_positions")(jnp.arange(L)[None] + 2)
    x_BxLxD = _layer_norm(cfg, "layernorm_embedding")(x_BxLxD + pos_1xLxD).astype(jnp.dtype(cfg.dtype))
    n, heads, mlp = ((cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_mlp_dim) if self.decoder
                     else (cfg.n_layers, cfg.n_heads, cfg.mlp_dim))
    for i in range(n):
      x_BxLxD = _BartLayer(cfg, heads, mlp, self.decoder, name=f"layers_{i}")(
          x_BxLxD, allowed_BxLxL, enc_BxSxD, cross_allowed_BxLxS)
    return x_BxLxD


def shift_tokens_right(tokens_BxL: Array, decoder_start_token_id: int) -> Array:
  """BART's decoder input: `decoder_start_token_id`, then the tokens without the last one."""
  start_Bx1 = jnp.full((tokens_BxL.shape[0], 1), decoder_start_token_id, tokens_BxL.dtype)
  return jnp.concatenate([start_Bx1, tokens_BxL[:, :-1]], axis=1)


class _BartModel(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, tokens_BxL: Array, mask_BxL: Array) -> Array:
    cfg = self.cfg
    B, L = tokens_BxL.shape
    shared = _embed(cfg, cfg.vocab_size, "shared")
    scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
    real_BxL = mask_BxL.astype(bool)
    enc_allowed_BxLxL = jnp.broadcast_to(real_BxL[:, None, :], (B, L, L))
    enc_BxLxD = _BartStack(cfg, False, name="encoder")(shared(tokens_BxL) * scale, enc_allowed_BxLxL)
    dec_in_BxL = shift_tokens_right(tokens_BxL, cfg.decoder_start_token_id)
    causal_BxLxL = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool))[None], (B, L, L))  # no padding mask
    return _BartStack(cfg, True, name="decoder")(shared(dec_in_BxL) * scale, causal_BxLxL, enc_BxLxD,
                                                 enc_allowed_BxLxL)


class _BartHead(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, h_BxD: Array) -> Array:
    h_BxD = jnp.tanh(_dense(self.cfg, self.cfg.d_model, "dense")(h_BxD))
    return _dense(self.cfg, self.cfg.num_labels, "out_proj")(h_BxD)


def last_eos_index(tokens_BxL: Array, mask_BxL: Array, eos_token_id: int) -> Array:
  """[B] index of each row's last real EOS token (the last real token when a row has none)."""
  real_BxL = mask_BxL.astype(bool)
  idx_1xL = jnp.arange(tokens_BxL.shape[1])[None]
  last_eos_B = jnp.max(jnp.where(real_BxL & (tokens_BxL == eos_token_id), idx_1xL, -1), axis=-1)
  last_real_B = jnp.max(jnp.where(real_BxL, idx_1xL, 0), axis=-1)
  return jnp.where(last_eos_B >= 0, last_eos_B, last_real_B)


# ------------------------------------------------------------------------------------------ classifier


class EncoderClassifier(nn.Module):
  """`DistilBertForSequenceClassification` or `BartForSequenceClassification` (by `config.arch`).

  `apply({"params": params}, tokens_BxL, attention_mask_BxL)` -> `ModelOutput(scores=[B, num_labels])`
  (float32 logits, as transformers' `.logits`). attention_mask_BxL: 1 real, 0 padding; None = all real.
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, tokens_BxL: Array, attention_mask_BxL: Array | None = None) -> ModelOutput:
    cfg = self.config
    tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
    if tokens_BxL.shape[1] > cfg.max_seq_len:
      raise ValueError(f"sequence length {tokens_BxL.shape[1]} exceeds the model's {cfg.max_seq_len} learned "
                       "positions")
    mask_BxL = jnp.ones_like(tokens_BxL) if attention_mask_BxL is None else jnp.asarray(attention_mask_BxL)
    B = tokens_BxL.shape[0]
    if cfg.arch == "distilbert":
      h_BxLxD = _DistilBertModel(cfg, name="distilbert")(tokens_BxL, mask_BxL)
      pooled_BxD = jax.nn.relu(_dense(cfg, cfg.d_model, "pre_classifier")(h_BxLxD[:, 0]))
      scores_BxC = _dense(cfg, cfg.num_labels, "classifier")(pooled_BxD)
    else:
      h_BxLxD = _BartModel(cfg, name="model")(tokens_BxL, mask_BxL)
      idx_B = last_eos_index(tokens_BxL, mask_BxL, cfg.eos_token_id)
      scores_BxC = _BartHead(cfg, name="classification_head")(h_BxLxD[jnp.arange(B), idx_B])
    return ModelOutput(scores=scores_BxC.astype(jnp.float32))


def abstract_params(model: EncoderClassifier) -> dict:
  """The parameter tree's shapes and dtypes (no computation)."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


# ---------------------------------------------------------------------------------------------- import


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """transformers' tensor name of a parameter path, and whether it is a transposed nn.Linear weight."""
  *mods, leaf = path
  name = ".".join(re.sub(r"^(layers?)_(\d+)$", r"\1.\2", m) for m in mods)
  return f"{name}.{'bias' if leaf == 'bias' else 'weight'}", leaf == "kernel"


def _int_or_none(value: Any) -> int | None:
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  return None if value is None else int(value)


def hf_config_to_encoder_config(hf: dict, *, source: str = "config.json", dtype: str = "float32",
                                param_dtype: str = "float32") -> EncoderConfig:
  """An `EncoderConfig` from a DistilBERT / BART sequence classifier's config.json dict."""

  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in ENCODER_ARCHITECTURES:
    raise CheckpointError(f"{source}: architectures {archs}: only {sorted(ENCODER_ARCHITECTURES)} are supported "
                          f"for model_type {hf.get('model_type')!r} (pro_jax imports these encoders as scorers only)")
  model_type = ENCODER_ARCHITECTURES[archs[0]]
  if hf.get("model_type", model_type) != model_type:
    raise CheckpointError(f"{source}: architecture {archs[0]} needs model_type {model_type!r}, "
                          f"found {hf.get('model_type')!r}")

  def field(*keys: str, default: Any = dataclasses.MISSING) -> Any:
    for k in keys:
      if hf.get(k) is not None:
        return hf[k]
    if default is dataclasses.MISSING:
      raise CheckpointError(f"{source}: missing field {keys[0]!r}")
    return default

  id2label = hf.get("id2label")
  if isinstance(id2label, dict) and id2label:
    try:
      labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    except ValueError as e:
      raise CheckpointError(f"{source}: id2label keys must be integers ({e})") from e
  else:
    labels = tuple(f"LABEL_{i}" for i in range(int(field("num_labels", default=2))))
  common = dict(arch=model_type, vocab_size=int(field("vocab_size")), num_labels=len(labels), labels=labels,
                pad_token_id=_int_or_none(hf.get("pad_token_id")), bos_token_id=_int_or_none(hf.get("bos_token_id")),
                eos_token_id=_int_or_none(hf.get("eos_token_id")), dtype=dtype, param_dtype=param_dtype)
  if model_type == "distilbert":
    kw = dict(d_model=int(field("dim", "hidden_size")), n_layers=int(field("n_layers", "num_hidden_layers")),
              n_heads=int(field("n_heads", "num_attention_heads")), mlp_dim=int(field("hidden_dim")),
              max_seq_len=int(field("max_position_embeddings")), activation=str(field("activation", default="gelu")),
              norm_eps=1e-12)
  else:
    for key in ("add_final_layer_norm", "normalize_before"):  # mBART-style options BartConfig does not have
      if hf.get(key):
        raise CheckpointError(f"{source}: unsupported {key}=true (BART is post-LN without a final layer norm)")
    eos = common["eos_token_id"]
    kw = dict(d_model=int(field("d_model", "hidden_size")), n_layers=int(field("encoder_layers")),
              n_heads=int(field("encoder_attention_heads")), mlp_dim=int(field("encoder_ffn_dim")),
              decoder_layers=int(field("decoder_layers")), decoder_heads=int(field("decoder_attention_heads")),
              decoder_mlp_dim=int(field("decoder_ffn_dim")), max_seq_len=int(field("max_position_embeddings")),
              activation=str(field("activation_function", default="gelu")), norm_eps=1e-5,
              scale_embedding=bool(hf.get("scale_embedding", False)),
              decoder_start_token_id=_int_or_none(hf.get("decoder_start_token_id", eos)))
    if eos is None:
      raise CheckpointError(f"{source}: BART needs eos_token_id (its classification head reads the last EOS)")
  try:
    return EncoderConfig(**kw, **common)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e


# Tensors transformers ties to `model.shared.weight` or does not use for classification; old
# checkpoints carry them (DistilBERT's `position_ids` buffer, BART's per-stack embed_tokens).
_IGNORED = re.compile(r"^(model\.(encoder|decoder)\.embed_tokens\.weight|final_logits_bias|"
                      r"distilbert\.embeddings\.position_ids|"
                      r"model\.(encoder|decoder)\.embed_positions\._float_tensor)$")


def load_encoder_classifier(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
                            mesh: Any = None, num_labels: int | None = None,
                            max_seq_len: int | None = None) -> tuple[EncoderClassifier, dict]:
  """Load a transformers DistilBERT / BART sequence classifier directory as `(EncoderClassifier, params)`.

  Every tensor's presence, shape and dtype is checked from the safetensors headers before any data is
  read (`CheckpointError` naming the file and tensor); single files and sharded ones with an index
  are read one tensor at a time. `mesh`: every parameter is replicated on it (NamedSharding with an
  empty PartitionSpec, whatever the mesh's axis names): these models are small (66M / 140M
  parameters). `num_labels`, when given, must equal the checkpoint's. `max_seq_len`, when given, must not
  exceed the learned positions (max_position_embeddings; longer inputs are refused by the model).
  """
  path = pathlib.Path(path)
  hf = hf_io.read_hf_config(path)
  source = str(path / "config.json")
  config = hf_config_to_encoder_config(hf, source=source, dtype=dtype, param_dtype=param_dtype)
  if num_labels is not None and int(num_labels) != config.num_labels:
    raise CheckpointError(f"{source}: num_labels={num_labels} requested, the classifier has {config.num_labels} "
                          "(encoder heads are used as trained; no new head is initialised)")
  if max_seq_len is not None and max_seq_len > config.max_seq_len:
    raise CheckpointError(f"{source}: max_seq_len={max_seq_len} exceeds max_position_embeddings={config.max_seq_len} "
                          "(learned position embeddings)")
  model = EncoderClassifier(config)
  flat_abstract = flax.traverse_util.flatten_dict(abstract_params(model))

  files, index = safetensors_io.checkpoint_files(path)
  tensors = safetensors_io.read_headers(files, index)
  where = str(index or files[0])
  # transformers' legacy names: LayerNorm `gamma` / `beta` for `weight` / `bias` (old BERT-family files)
  file_name = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", n)): n for n in tensors}
  plan = []
  for p, leaf in flat_abstract.items():
    name, transpose = _hf_name(p)
    name = file_name.get(name, name)
    shape = tuple(leaf.shape)
    hf_shape = tuple(reversed(shape)) if transpose else shape
    info = tensors.get(name)
    if info is None:
      raise CheckpointError(f"{where}: missing tensor {name} (expected shape {list(hf_shape)}) for "
                            f"{hf['architectures'][0]}")
    if info.shape != hf_shape:
      raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(hf_shape)} "
                            "from config.json")
    if info.dtype not in safetensors_io.FLOAT_DTYPES:
      raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; only float tensors "
                            f"{sorted(safetensors_io.FLOAT_DTYPES)} are supported")
    plan.append((p, name, transpose, shape, leaf.dtype))
  expected = {name for _, name, *_ in plan}
  for name, info in tensors.items():
    if name not in expected and not _IGNORED.match(name):
      raise CheckpointError(f"{info.file}: unexpected tensor {name} (shape {list(info.shape)}) for "
                            f"{hf['architectures'][0]} with config.json's settings")

  sharding = None
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    sharding = NamedSharding(mesh, PartitionSpec())
  flat = {}
  with safetensors_io.TensorReader(tensors) as reader:
    for p, name, transpose, shape, leaf_dtype in plan:

      def read(idx, name=name, transpose=transpose, leaf_dtype=leaf_dtype):
        return np.ascontiguousarray(reader.read(name, idx, transpose).astype(leaf_dtype, copy=False))

      flat[p] = hf_io._place(shape, leaf_dtype, sharding, read)
  return model, flax.traverse_util.unflatten_dict(flat)


def load_hf_classifier(path: pathlib.Path, hf: dict, *, dtype: str, param_dtype: str, mesh: Any, rules: Any,
                       head: str | None, num_labels: int | None, value_head: bool, lora: LoRAConfig | None,
                       max_seq_len: int | None, config_overrides: dict) -> tuple[Any, dict] | None:
  """`load_hf_model`'s hook (`hf_io.ARCHITECTURE_LOADERS`): DistilBERT / BART classifiers, else None.

  They are scorers only: the decoder-only options (a new head, value head, LoRA, ModelConfig fields)
  are refused; `rules` does not apply (their parameters are replicated on `mesh`).
  """
  archs = hf.get("architectures") or []
  if hf.get("model_type") not in ENCODER_MODEL_TYPES and not set(archs) & set(ENCODER_ARCHITECTURES):
    return None
  del rules
  refused = [k for k, v in (("head", head not in (None, "score")), ("value_head", value_head),
                            ("lora", lora is not None)) if v] + sorted(config_overrides)
  if refused:
    raise CheckpointError(f"{path / 'config.json'}: {archs or hf.get('model_type')} is imported as a sequence "
                          f"classifier only; unsupported options {refused}")
  return load_encoder_classifier(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                 num_labels=num_labels, max_seq_len=max_seq_len)


hf_io.ARCHITECTURE_LOADERS.append(load_hf_classifier)

__all__ = ["load_hf_classifier", "ENCODER_ARCHITECTURES", "ENCODER_MODEL_TYPES", "EncoderClassifier", "EncoderConfig", "abstract_params",
           "hf_config_to_encoder_config", "last_eos_index", "load_encoder_classifier", "shift_tokens_right"]
