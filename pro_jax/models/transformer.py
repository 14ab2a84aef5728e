"""One decoder-only transformer for the Llama family and GPT-2 (Flax Linen, pure functions).

Parameters are plain pytrees: ``model.apply({"params": params}, tokens_BxL, attention_mask_BxL=...)``
returns a :class:`ModelOutput`. Layers are stacked on a leading ``layers`` axis (``nn.scan``), so
the parameter layout is the same whether the layer loop is scanned or unrolled. Every parameter
carries logical axis names (vocab, embed, heads, kv_heads, mlp, layers) that
``pro_jax.sharding`` maps onto a device mesh.

LoRA variables (when ``config.lora`` is set) live in their own collection, ``"lora"``:
``model.apply({"params": params, "lora": lora}, ...)``.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pro_jax.models.config import REMAT_POLICIES, LoRAConfig, ModelConfig

Array = jax.Array

# Logical axis names used by the model (parameters and activations).
BATCH, LENGTH, EMBED, HEADS, KV_HEADS, MLP, VOCAB, LAYERS = (
    "batch", "length", "embed", "heads", "kv_heads", "mlp", "vocab", "layers")


@flax.struct.dataclass
class ModelOutput:
  """What a forward pass returns. Fields that the config does not produce are None."""

  logits: Array | None = None  # [B, L, V] float32 (head="lm")
  scores: Array | None = None  # [B, num_labels] float32, read at the last non-pad token (head="score")
  values: Array | None = None  # [B, L] float32 (value_head=True)
  hidden: Array | None = None  # [B, L, D] final (normed) hidden states, compute dtype
  cache: Any = None  # updated KV cache when one was passed


# Stacks of at most this many layers run unrolled even with `scan_layers=True`: the scan only saves
# compile time at depth, and unrolled layers run faster (7% on a 4-layer DPO step on CPU). The
# parameter layout is the same either way.
UNROLL_MAX_LAYERS = 8


def scans_layers(cfg: ModelConfig) -> bool:
  """Whether the layer loop is a scan (True) or unrolled."""
  return bool(cfg.scan_layers) and cfg.n_layers > UNROLL_MAX_LAYERS


# Activations a Block tags with `checkpoint_name`, for the named remat policies below. Saving them
# lets the backward pass skip re-running every large matmul of the layer: the attention backward
# needs q, k, v (after RoPE), o_proj's LoRA factor needs the attention output, the MLP backward
# needs the gate and up projections (after their LoRA deltas), the MLP's norm needs the residual
# stream after the attention (else o_proj is re-run), and each LoRA's weight gradient needs x @ A
# (r wide). Frozen base weights need no input activations (no weight gradient), so in a LoRA
# step these are all the matmul results the backward reads.
ATTN_NAMES = ("attn_q", "attn_k", "attn_v", "attn_out", "resid_mid")
MLP_NAMES = ("mlp_gate", "mlp_up")
LORA_NAMES = ("lora_xa",)
REMAT_NAMES = {
    # save q, k, v, the attention output and the residual after it: the MLP's matmuls are re-run
    "save_attn": ATTN_NAMES + LORA_NAMES,
    # save the gate and up projections: q, k, v and the attention are re-run
    "save_mlp": MLP_NAMES + LORA_NAMES,
    # save both: no projection is re-run (only norms, RoPE, the softmax and elementwise ops)
    "save_proj": ATTN_NAMES + MLP_NAMES + LORA_NAMES,
}
assert set(REMAT_POLICIES) == {"none", "full", "dots", "dots_no_batch", *REMAT_NAMES}


def _remat_policy(name: str):
  """The `jax.checkpoint` policy of `ModelConfig.remat` (what the backward pass may read instead of
  recomputing): "full" saves nothing but the layer input, "dots" every matmul output,
  "dots_no_batch" every matmul without batch dimensions (the projections, LoRA's factors included),
  and the `REMAT_NAMES` policies only the activations tagged with those names."""
  if name in REMAT_NAMES:
    return jax.checkpoint_policies.save_only_these_names(*REMAT_NAMES[name])
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


def _dot(x: Array, w: Array, out_dtype: Any = None) -> Array:
  """x @ w accumulated in float32, returned in `out_dtype` (default x's dtype). For bf16 operands this
  is what TPUs do anyway, and on CPU it is what selects XLA's fast bf16 GEMM (a bf16-output dot falls
  back to a loop ~40x slower on jaxlib 0.10's CPU backend; benchmarks/bench_generate_real.py)."""
  y = jnp.dot(x, w, preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


def _init_normal(std: float):
  return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
  """x @ kernel (+ bias), kernel [in, out]; optional LoRA delta (dropout(x) @ a @ b) * alpha / r."""

  features: int
  axes: tuple[str | None, str | None]
  cfg: ModelConfig
  use_bias: bool = False
  kernel_std: float = 0.02
  lora: LoRAConfig | None = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    in_features = x.shape[-1]
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(_init_normal(self.kernel_std), self.axes),
        (in_features, self.features), cfg.jnp_param_dtype)
    dtype = cfg.jnp_dtype
    x = x.astype(dtype)
    y = _dot(x, kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), cfg.jnp_param_dtype)
      y = y + bias.astype(dtype)
    if self.lora is not None:
      r = self.lora.rank
      # PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in)); B = 0.
      bound = 1.0 / math.sqrt(in_features)
      a_init = nn.with_logical_partitioning(
          lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound), (self.axes[0], None))
      b_init = nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1]))
      a = self.variable("lora", "a", lambda: a_init(self.make_rng("params"), (in_features, r),
                                                    cfg.jnp_param_dtype)).value
      b = self.variable("lora", "b", lambda: b_init(self.make_rng("params"), (r, self.features),
                                                    cfg.jnp_param_dtype)).value
      xd = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic) if self.lora.dropout else x
      xa = checkpoint_name(_dot(xd, a.astype(dtype)), "lora_xa")
      y = y + _dot(xa, b.astype(dtype)) * jnp.asarray(self.lora.scale, dtype)
    return y


class RMSNorm(nn.Module):
  """RMSNorm over the last axis. Llama: scale * x_normed.astype(dtype); with `cfg.norm_offset`
  (Gemma): (norm_offset + scale) * x_normed in float32, then cast (scale initialised to 0)."""

  cfg: ModelConfig
  axis_name: str | None = EMBED  # logical axis of the scale (None for the per-head q/k norms)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                       (x.shape[-1],), cfg.jnp_param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_offset:  # HF Gemma: (x * (1 + weight.float())).type_as(x)
      return (xf * (cfg.norm_offset + scale.astype(jnp.float32))).astype(cfg.jnp_dtype)
    # HF Llama: weight * hidden.to(input_dtype)
    return (scale.astype(cfg.jnp_dtype) * xf.astype(cfg.jnp_dtype))


class LayerNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                       (d,), self.cfg.jnp_param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                      (d,), self.cfg.jnp_param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale.astype(jnp.float32) + bias.astype(
        jnp.float32)
    return y.astype(self.cfg.jnp_dtype)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
  return (LayerNorm if cfg.arch == "gpt2" else RMSNorm)(cfg, name=name)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse RoPE frequencies [hd/2], with HF's rope_scaling types default / linear / llama3.

  `local=True`: those of sliding-window layers, `cfg.local_rope_theta` unscaled when it is set."""
  hd = cfg.hd
  if local and cfg.local_rope_theta is not None:
    return (1.0 / (cfg.local_rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))).astype(np.float32)
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  rs = cfg.rope_scaling
  if rs.type in ("default", None):
    pass
  elif rs.type == "linear":
    inv_freq = inv_freq / rs.factor
  elif rs.type == "llama3":
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / rs.factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(is_medium, smoothed, inv_freq_llama)
  else:
    raise ValueError(f"unsupported rope_scaling type {rs.type!r} (supported: default, linear, llama3)")
  return inv_freq.astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions_BxL: Array, local: bool = False) -> tuple[Array, Array]:
  """cos, sin [B, L, hd] in HF's half-rotation layout (cat(freqs, freqs))."""
  inv_freq = jnp.asarray(rope_inv_freq(cfg, local))
  freqs = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxLxHxD: Array, cos: Array, sin: Array) -> Array:
  dtype = x_BxLxHxD.dtype
  x = x_BxLxHxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(dtype)


def softcapped_attention(q_BxTxHxD: Array, k_BxSxKxD: Array, v_BxSxKxD: Array, mask_Bx1xTxS: Array,
                         scale: float, softcap: float) -> Array:
  """Grouped-query attention with Gemma 2's logit soft-capping (cap * tanh(logits / cap) after the
  scale, before the mask). jax.nn.dot_product_attention has no soft-cap, so this follows its XLA
  path otherwise: float32 logits, masked slots at the dtype's large negative, float32 softmax."""
  B, T, H, D = q_BxTxHxD.shape
  K = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
  logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                preferred_element_type=jnp.float32) * jnp.float32(scale)
  logits_BxKxGxTxS = jnp.tanh(logits_BxKxGxTxS / softcap) * softcap
  logits_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], logits_BxKxGxTxS, jnp.finfo(jnp.float32).min * 0.7)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD)
  return out_BxTxKxGxD.reshape(B, T, H, D)


class Attention(nn.Module):
  cfg: ModelConfig
  deterministic: bool = True

  def _lora(self, target: str) -> LoRAConfig | None:
    lora = self.cfg.lora
    return lora if lora is not None and target in lora.targets else None

  def _linear(self, features, axes, name, use_bias=False, std=0.02):
    return Linear(features, axes, self.cfg, use_bias=use_bias, kernel_std=std, lora=self._lora(name),
                  deterministic=self.deterministic, name=name)

  @nn.compact
  def __call__(self, x_BxLxD, cos, sin, mask_Bx1xLxS, layer_cache, cache_index):
    cfg = self.cfg
    B, L, _ = x_BxLxD.shape
    H, K, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    if cfg.arch == "gpt2":
      qkv = self._linear(3 * H * hd, (EMBED, HEADS), "c_attn", use_bias=True)(x_BxLxD)
      q, k, v = jnp.split(qkv, 3, axis=-1)
    else:
      q = self._linear(H * hd, (EMBED, HEADS), "q_proj", use_bias=cfg.qkv_bias)(x_BxLxD)
      k = self._linear(K * hd, (EMBED, KV_HEADS), "k_proj", use_bias=cfg.qkv_bias)(x_BxLxD)
      v = self._linear(K * hd, (EMBED, KV_HEADS), "v_proj", use_bias=cfg.qkv_bias)(x_BxLxD)
    q_BxLxHxD = q.reshape(B, L, H, hd)
    k_BxLxKxD = k.reshape(B, L, K, hd)
    v_BxLxKxD = v.reshape(B, L, K, hd)
    if cfg.qk_norm:  # Qwen3 / Gemma 3: per-head RMSNorm over head_dim, before RoPE
      q_BxLxHxD = RMSNorm(cfg, None, name="q_norm")(q_BxLxHxD)
      k_BxLxKxD = RMSNorm(cfg, None, name="k_norm")(k_BxLxKxD)
    if cfg.arch != "gpt2":
      q_BxLxHxD = apply_rope(q_BxLxHxD, cos, sin)
      k_BxLxKxD = apply_rope(k_BxLxKxD, cos, sin)
    q_BxLxHxD = checkpoint_name(q_BxLxHxD, "attn_q")
    k_BxLxKxD = checkpoint_name(k_BxLxKxD, "attn_k")
    v_BxLxKxD = checkpoint_name(v_BxLxKxD, "attn_v")
    new_cache = None
    if layer_cache is not None:
      ck = jax.lax.dynamic_update_slice(layer_cache["k"], k_BxLxKxD.astype(layer_cache["k"].dtype),
                                        (0, cache_index, 0, 0))
      cv = jax.lax.dynamic_update_slice(layer_cache["v"], v_BxLxKxD.astype(layer_cache["v"].dtype),
                                        (0, cache_index, 0, 0))
      new_cache = {"k": ck, "v": cv}
      k_BxLxKxD, v_BxLxKxD = ck.astype(q_BxLxHxD.dtype), cv.astype(q_BxLxHxD.dtype)
    scale = 1.0 / math.sqrt(hd) if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    if cfg.attn_logit_softcap is not None:
      out_BxLxHxD = softcapped_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, mask_Bx1xLxS, scale,
                                         cfg.attn_logit_softcap)
    else:
      out_BxLxHxD = jax.nn.dot_product_attention(
          q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, mask=mask_Bx1xLxS, scale=scale, implementation=cfg.attention_impl)
    out = checkpoint_name(out_BxLxHxD.reshape(B, L, H * hd), "attn_out")
    name = "c_proj" if cfg.arch == "gpt2" else "o_proj"
    out = self._linear(cfg.d_model, (HEADS, EMBED), name, use_bias=cfg.arch == "gpt2" or cfg.o_bias,
                       std=out_std)(out)
    return out, new_cache


class FeedForward(nn.Module):
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)

    def lin(features, axes, name, use_bias=False, std=0.02):
      lora = cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None
      return Linear(features, axes, cfg, use_bias=use_bias, kernel_std=std, lora=lora,
                    deterministic=self.deterministic, name=name)

    if cfg.arch == "gpt2":
      h = lin(cfg.mlp_dim, (EMBED, MLP), "c_fc", use_bias=True)(x_BxLxD)
      h = jax.nn.gelu(h, approximate=True)  # == HF gelu_new
      return lin(cfg.d_model, (MLP, EMBED), "c_proj", use_bias=True, std=out_std)(h)
    gate = checkpoint_name(lin(cfg.mlp_dim, (EMBED, MLP), "gate_proj", use_bias=cfg.mlp_bias)(x_BxLxD), "mlp_gate")
    up = checkpoint_name(lin(cfg.mlp_dim, (EMBED, MLP), "up_proj", use_bias=cfg.mlp_bias)(x_BxLxD), "mlp_up")
    act = jax.nn.silu(gate) if cfg.mlp_act == "silu" else jax.nn.gelu(gate, approximate=True)
    h = nn.with_logical_constraint(act * up, (BATCH, LENGTH, MLP))
    return lin(cfg.d_model, (MLP, EMBED), "down_proj", use_bias=cfg.mlp_bias, std=out_std)(h)


class Block(nn.Module):
  """Pre-norm residual block (with `sandwich_norms`, the attention and MLP outputs are normed too).

  Signature fits nn.scan: (carry, broadcast ctx, per-layer inputs). The per-layer inputs are the
  layer's KV cache and, for models whose layers differ (`config.mixed_layers`), its `sliding` flag,
  which picks the local or global RoPE tables and mask from ctx (a select, not Python branching, so
  the layers still scan).
  """

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, ctx, per_layer):
    cfg = self.cfg
    layer_cache, sliding = per_layer
    cos, sin, mask, cache_index = ctx[:4]
    if sliding is not None:  # mixed local / global layers: ctx also holds the local tables and mask
      cos_local, sin_local, mask_local = ctx[4:]
      cos, sin = jnp.where(sliding, cos_local, cos), jnp.where(sliding, sin_local, sin)
      mask = jnp.where(sliding, mask_local, mask)
    h, new_cache = Attention(cfg, self.deterministic, name="attn")(
        _norm(cfg, "attn_norm")(x_BxLxD), cos, sin, mask, layer_cache, cache_index)
    if cfg.sandwich_norms:
      h = _norm(cfg, "post_attn_norm")(h)
    x_BxLxD = checkpoint_name(x_BxLxD + h, "resid_mid")
    h = FeedForward(cfg, self.deterministic, name="mlp")(_norm(cfg, "mlp_norm")(x_BxLxD))
    if cfg.sandwich_norms:
      h = _norm(cfg, "post_mlp_norm")(h)
    x_BxLxD = x_BxLxD + h
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, (BATCH, LENGTH, EMBED))
    return x_BxLxD, new_cache


def make_attention_mask(attention_mask_BxS: Array | None, q_len: int, kv_len: int,
                        q_offset: Array | int = 0, sliding_window: int | None = None) -> Array:
  """Boolean [B, 1, q_len, kv_len]: causal (query i sits at slot q_offset + i) and key not padding.

  With `sliding_window` (Mistral / Qwen2), a query also sees only keys in slots
  (q_slot - sliding_window, q_slot], as HF's `sliding_window_overlay` (slots, not positions).
  Every query may attend to its own slot, so rows of padding never see an all-masked softmax.
  """
  q_slot = jnp.arange(q_len)[:, None] + q_offset
  k_slot = jnp.arange(kv_len)[None, :]
  causal = k_slot <= q_slot  # [q, kv]
  if sliding_window is not None:
    causal = causal & (k_slot > q_slot - sliding_window)
  if attention_mask_BxS is None:
    return causal[None, None]
  valid = attention_mask_BxS.astype(bool)[:, None, None, :]
  return (causal[None, None] & valid) | (k_slot == q_slot)[None, None]


def positions_from_mask(attention_mask_BxL: Array) -> Array:
  """Positions for left- or right-padded rows: count of real tokens before each slot."""
  m = attention_mask_BxL.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def last_token_index(attention_mask_BxL: Array | None, length: int, batch: int) -> Array:
  """Index of the last non-pad token per row (HF sequence-classification convention)."""
  if attention_mask_BxL is None:
    return jnp.full((batch,), length - 1, jnp.int32)
  idx = jnp.arange(length, dtype=jnp.int32)[None, :]
  return jnp.max(jnp.where(attention_mask_BxL.astype(bool), idx, 0), axis=-1)


def soft_weight_delta(cfg: ModelConfig, tokens_BxL: Array, mask_BxL: Array | None, weights_BxK: Array,
                      w_embed_KxNxD: Array) -> Array:
  """[B, L, D] additions: the j-th real `weight_token_id` of a row (j < weight_tokens) gets
  sum_k w_k * w_embed[k, j]; every other position gets 0."""
  hit_BxL = tokens_BxL == cfg.weight_token_id
  if mask_BxL is not None:
    hit_BxL = hit_BxL & (mask_BxL > 0)
  j_BxL = jnp.cumsum(hit_BxL.astype(jnp.int32), axis=1) - 1
  hit_BxL = hit_BxL & (j_BxL < cfg.weight_tokens)
  per_slot_BxNxD = jnp.einsum("bk,knd->bnd", weights_BxK.astype(jnp.float32), w_embed_KxNxD.astype(jnp.float32))
  picked_BxLxD = jnp.take_along_axis(per_slot_BxNxD, jnp.clip(j_BxL, 0, cfg.weight_tokens - 1)[..., None], axis=1)
  return jnp.where(hit_BxL[..., None], picked_BxLxD, 0.0).astype(cfg.jnp_dtype)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, Array]:
  """Zeroed KV cache {"k", "v"}: [n_layers, B, max_len, n_kv_heads, head_dim]."""
  dtype = dtype or cfg.jnp_dtype
  shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.hd)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def embed_tokens(cfg: ModelConfig, embedding_VxD: Array, tokens_BxL: Array) -> Array:
  """Token embeddings in the compute dtype (Gemma: times sqrt(d_model), the factor in that dtype)."""
  x_BxLxD = jnp.take(embedding_VxD, tokens_BxL, axis=0).astype(cfg.jnp_dtype)
  if cfg.scale_embeddings:  # HF Gemma: embed * tensor(sqrt(hidden)).to(dtype)
    x_BxLxD = x_BxLxD * jnp.asarray(np.float32(cfg.d_model**0.5), cfg.jnp_dtype)
  return x_BxLxD


def layer_context(cfg: ModelConfig, positions_BxL: Array, key_mask_BxS: Array | None, L: int, kv_len: int,
                  q_offset: Array | int, cache_index: Array | int) -> tuple[tuple, Array | None]:
  """(ctx, sliding_N) for `Block`: the RoPE tables and attention mask every layer shares and, for
  models with local / global layers (`cfg.mixed_layers`), the local ones too plus each layer's flag."""
  if cfg.arch == "gpt2":
    cos = sin = None
  else:  # every layer sliding (Mistral): the local RoPE (local_rope_theta, when set) for all of them
    cos, sin = rope_cos_sin(cfg, positions_BxL, local=all(cfg.sliding_layers))
  if not cfg.mixed_layers:
    mask = make_attention_mask(key_mask_BxS, L, kv_len, q_offset, sliding_window=cfg.sliding_window)
    return (cos, sin, mask, cache_index), None
  mask = make_attention_mask(key_mask_BxS, L, kv_len, q_offset)
  mask_local = make_attention_mask(key_mask_BxS, L, kv_len, q_offset, sliding_window=cfg.sliding_window)
  ctx = (cos, sin, mask, cache_index, *rope_cos_sin(cfg, positions_BxL, local=True), mask_local)
  return ctx, jnp.asarray(cfg.sliding_layers)


def softcap_logits(cfg: ModelConfig, logits: Array) -> Array:
  """Gemma 2's final soft-cap (the LM head only, as in HF); identity for other models."""
  if cfg.final_logit_softcap is None:
    return logits
  return jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap


class Transformer(nn.Module):
  """Decoder-only transformer. See module docstring."""

  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BxL: Array, attention_mask_BxL: Array | None = None,
               positions_BxL: Array | None = None, *, cache: dict | None = None,
               cache_index: Array | int = 0, cache_mask_BxT: Array | None = None,
               weights_BxK: Array | None = None, logit_positions_BxR: Array | None = None) -> ModelOutput:
    """Forward pass.

    Args:
      tokens_BxL: int token ids.
      attention_mask_BxL: 1 for real tokens, 0 for padding (left or right). None = all real.
      positions_BxL: position ids; default derived from the mask (correct for left padding).
      cache: KV cache from `init_cache` for incremental decoding; the new keys/values are written
        at slots [cache_index, cache_index + L).
      cache_mask_BxT: with a cache, 1 for the cache slots holding real tokens (including the ones
        being written now); required with a cache.
      weights_BxK: objective weights for a model with soft weight tokens (`config.weight_tokens`):
        the j-th real occurrence of `config.weight_token_id` in a row gets w . weight_embed[:, j]
        added to its embedding. None: no addition (decode steps after the prompt).
      logit_positions_BxR: LM head only at these positions of each row: `logits` is [B, R, V]
        (`hidden` stays [B, L, D]). Saves the vocab projection where no logit is needed (a DPO loss
        reads only the response's).
    """
    cfg = self.config
    B, L = tokens_BxL.shape
    dtype = cfg.jnp_dtype
    if positions_BxL is None:
      if attention_mask_BxL is not None and cache is None:
        positions_BxL = positions_from_mask(attention_mask_BxL)
      else:
        positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None] + cache_index, (B, L))

    embedding = self.param("embed", nn.with_logical_partitioning(_init_normal(0.02), (VOCAB, EMBED)),
                           (cfg.vocab_size, cfg.d_model), cfg.jnp_param_dtype)
    x_BxLxD = embed_tokens(cfg, embedding, tokens_BxL)
    if cfg.weight_tokens:
      w_embed_KxNxD = self.param(
          "weight_embed", nn.with_logical_partitioning(_init_normal(0.02), (None, None, EMBED)),
          (cfg.num_weights, cfg.weight_tokens, cfg.d_model), cfg.jnp_param_dtype)
      if weights_BxK is not None:
        x_BxLxD = x_BxLxD + soft_weight_delta(cfg, tokens_BxL, attention_mask_BxL, weights_BxK, w_embed_KxNxD)
    if cfg.arch == "gpt2":
      wpe = self.param("wpe", nn.with_logical_partitioning(_init_normal(0.01), (None, EMBED)),
                       (cfg.max_seq_len, cfg.d_model), cfg.jnp_param_dtype)
      x_BxLxD = x_BxLxD + jnp.take(wpe, positions_BxL, axis=0).astype(dtype)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, (BATCH, LENGTH, EMBED))

    if cache is None:
      key_mask_BxS, kv_len, q_offset = attention_mask_BxL, L, 0
      layer_caches = None
    else:
      if cache_mask_BxT is None:
        raise ValueError("cache_mask_BxT is required when decoding with a cache")
      key_mask_BxS, kv_len, q_offset = cache_mask_BxT, cache["k"].shape[2], cache_index
      layer_caches = cache
    ctx, sliding_N = layer_context(cfg, positions_BxL, key_mask_BxS, L, kv_len, q_offset, cache_index)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, prevent_cse=False, policy=_remat_policy(cfg.remat))
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0),
        length=cfg.n_layers,
        unroll=1 if scans_layers(cfg) else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS},
    )
    x_BxLxD, new_cache = stack(cfg, self.deterministic, name="layers")(
        x_BxLxD, ctx, (layer_caches, sliding_N))
    hidden = _norm(cfg, "final_norm")(x_BxLxD)

    out = {"hidden": hidden, "cache": new_cache}
    if cfg.head == "lm":
      h = hidden
      if logit_positions_BxR is not None:
        h = jnp.take_along_axis(hidden, logit_positions_BxR.astype(jnp.int32)[..., None], axis=1)
      if cfg.tie_embeddings:
        logits = _dot(h, embedding.astype(dtype).T, out_dtype=jnp.float32)
      else:
        logits = Linear(cfg.vocab_size, (EMBED, VOCAB), cfg, name="lm_head")(h)
      logits = logits.astype(jnp.float32)
      logits = softcap_logits(cfg, logits)
      out["logits"] = nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB))
    elif cfg.head == "score":
      idx = last_token_index(attention_mask_BxL, L, B)
      h_last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
      out["scores"] = Linear(cfg.num_labels, (EMBED, None), cfg, name="score")(h_last).astype(jnp.float32)
    if cfg.value_head:
      values = Linear(1, (EMBED, None), cfg, use_bias=True, name="value_head")(hidden)
      out["values"] = values[..., 0].astype(jnp.float32)
    return ModelOutput(**out)


def init_variables(model: Transformer, rng: Array, seq_len: int = 8) -> dict:
  """Random variables {"params": ..., ["lora": ...]} as plain arrays (metadata boxes removed)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(model.init(rng, tokens))


def logical_axes(model: Transformer, seq_len: int = 8) -> dict:
  """Pytree matching `init_variables` whose leaves are PartitionSpecs of logical axis names."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  abstract = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  return nn.get_partition_spec(abstract)


def abstract_variables(model: Transformer, seq_len: int = 8) -> dict:
  """ShapeDtypeStructs of the variables, without allocating anything."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens))
