"""Model configuration: one frozen dataclass describes every supported decoder.

The same `Transformer` module runs the Llama family (Llama 2/3, Mistral, Qwen2; RMSNorm, RoPE,
SwiGLU, GQA, optional q/k/v bias), its variants selected by options (Qwen3: q/k norm; Gemma 2 / 3:
RMSNorm with a (1 + scale) offset, sqrt(d_model)-scaled embeddings, GeGLU, sandwich norms, logit
soft-capping, query_pre_attn_scalar, per-layer local / global attention with a local RoPE theta)
and GPT-2 (LayerNorm, learned positions, gelu_new, fused c_attn).
Configs are hashable so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import jax.numpy as jnp

Arch = Literal["llama", "gpt2"]
Head = Literal["lm", "score", "none"]
Remat = Literal["none", "full", "dots", "dots_no_batch", "save_attn", "save_mlp", "save_proj"]
REMAT_POLICIES: tuple[str, ...] = get_args(Remat)  # pro_jax.models.transformer._remat_policy says what each saves
MlpAct = Literal["silu", "gelu_tanh"]
LAYER_TYPES = ("full_attention", "sliding_attention")

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """HF `rope_scaling` / `rope_parameters`. type: "default" | "linear" | "llama3"."""

  type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on named projections; their variables live in the "lora" collection."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"LoRAConfig.rank must be positive, got {self.rank}")
    known = set(LLAMA_LORA_TARGETS) | set(GPT2_LORA_TARGETS)
    bad = [t for t in self.targets if t not in known]
    if bad:
      raise ValueError(f"unknown LoRA target(s) {bad}; choose from {sorted(known)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything needed to build a decoder. Field names follow HF where one exists."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  mlp_dim: int
  arch: Arch = "llama"
  n_kv_heads: int | None = None  # None = n_heads (MHA)
  head_dim: int | None = None  # None = d_model // n_heads
  max_seq_len: int = 2048
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  qkv_bias: bool = False  # Qwen2: True
  o_bias: bool = False  # HF Llama `attention_bias`: a bias on o_proj as well (with qkv_bias=True)
  mlp_bias: bool = False  # HF Llama `mlp_bias`: biases on gate / up / down projections
  sliding_window: int | None = None  # Mistral / Qwen2: each query sees only the last `sliding_window` slots
  # Per-layer attention kind ("full_attention" | "sliding_attention", HF's `layer_types`); None = every
  # layer sliding when `sliding_window` is set, else every layer full. Gemma 2: alternating, Gemma 3: 5:1.
  layer_types: tuple[str, ...] | None = None
  local_rope_theta: float | None = None  # RoPE theta of sliding layers (unscaled RoPE); None = rope_theta + rope_scaling
  qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over head_dim on q and k (per head) before RoPE
  norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (1 + scale) in float32, then casts (scale init 0)
  scale_embeddings: bool = False  # Gemma: embeddings * sqrt(d_model) (the factor in the compute dtype)
  mlp_act: MlpAct = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gelu_pytorch_tanh)
  sandwich_norms: bool = False  # Gemma 2 / 3: also norm the attention and MLP outputs before the residual add
  query_pre_attn_scalar: float | None = None  # Gemma: attention scale query_pre_attn_scalar**-0.5 (None: hd**-0.5)
  attn_logit_softcap: float | None = None  # Gemma 2: attention logits -> cap * tanh(logits / cap)
  final_logit_softcap: float | None = None  # Gemma 2: LM logits -> cap * tanh(logits / cap)
  tie_embeddings: bool = False
  head: Head = "lm"  # "score": sequence classification (reward model), "none": hidden states only
  num_labels: int = 1  # width of the score head (K objectives for a multi-head reward model)
  value_head: bool = False  # per-token scalar value (PPO critic)
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: Remat = "none"
  scan_layers: bool = True  # scan over layers when deeper than transformer.UNROLL_MAX_LAYERS; False unrolls
  attention_impl: str | None = None  # passed to jax.nn.dot_product_attention ("xla", "cudnn")
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  lora: LoRAConfig | None = None
  # Soft weight tokens (weight-conditioned policies, "soft" conditioning): each of the first
  # `weight_tokens` occurrences of `weight_token_id` in a row gets w . weight_embed[:, j] added to its
  # embedding, for the row's objective weights w [num_weights] (`Transformer(weights_BxK=...)`).
  weight_tokens: int = 0
  num_weights: int = 0
  weight_token_id: int = 0

  def __post_init__(self):
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_seq_len"):
      if getattr(self, f) <= 0:
        raise ValueError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
    if self.arch not in ("llama", "gpt2"):
      raise ValueError(f"ModelConfig.arch must be 'llama' or 'gpt2', got {self.arch!r}")
    if self.head not in ("lm", "score", "none"):
      raise ValueError(f"ModelConfig.head must be 'lm', 'score' or 'none', got {self.head!r}")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}; set head_dim")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"ModelConfig.sliding_window must be positive or None, got {self.sliding_window}")
    if self.arch == "gpt2" and (self.o_bias or self.mlp_bias):
      raise ValueError("o_bias / mlp_bias are Llama-family options (GPT-2 always has biases)")
    llama_only = dict(layer_types=self.layer_types is not None, local_rope_theta=self.local_rope_theta is not None,
                      qk_norm=self.qk_norm, norm_offset=self.norm_offset != 0.0,
                      scale_embeddings=self.scale_embeddings, mlp_act=self.mlp_act != "silu",
                      sandwich_norms=self.sandwich_norms)
    if self.arch == "gpt2" and any(llama_only.values()):
      raise ValueError(f"{[k for k, v in llama_only.items() if v]}: RoPE-family options, not for GPT-2")
    if self.layer_types is not None:
      if not isinstance(self.layer_types, tuple):
        raise ValueError("ModelConfig.layer_types must be a tuple (hashable), got "
                         f"{type(self.layer_types).__name__}")
      if len(self.layer_types) != self.n_layers:
        raise ValueError(f"ModelConfig.layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise ValueError(f"ModelConfig.layer_types: unknown kind(s) {bad}; choose from {LAYER_TYPES}")
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        raise ValueError("ModelConfig.layer_types has sliding_attention layers but sliding_window is None")
    if self.mlp_act not in ("silu", "gelu_tanh"):
      raise ValueError(f"ModelConfig.mlp_act must be 'silu' or 'gelu_tanh', got {self.mlp_act!r}")
    for f in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "local_rope_theta"):
      v = getattr(self, f)
      if v is not None and not v > 0:
        raise ValueError(f"ModelConfig.{f} must be positive or None, got {v}")
    if self.weight_tokens < 0 or (self.weight_tokens > 0 and self.num_weights <= 0):
      raise ValueError(f"soft weight tokens need weight_tokens >= 0 and num_weights > 0, got weight_tokens="
                       f"{self.weight_tokens}, num_weights={self.num_weights}")
    if self.weight_tokens and not 0 <= self.weight_token_id < self.vocab_size:
      raise ValueError(f"weight_token_id {self.weight_token_id} is outside the vocabulary [0, {self.vocab_size})")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat: unknown policy {self.remat!r} (known: {', '.join(REMAT_POLICIES)})")
    if self.arch == "gpt2" and self.kv_heads != self.n_heads:
      raise ValueError("GPT-2 has no grouped-query attention (n_kv_heads must equal n_heads)")
    if self.lora is not None:
      allowed = GPT2_LORA_TARGETS if self.arch == "gpt2" else LLAMA_LORA_TARGETS
      bad = [t for t in self.lora.targets if t not in allowed]
      if bad:
        raise ValueError(f"LoRA target(s) {bad} do not exist in a {self.arch} model; choose from {allowed}")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def hd(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: True where attention is restricted to the last `sliding_window` slots."""
    if self.sliding_window is None:
      return (False,) * self.n_layers
    if self.layer_types is None:
      return (True,) * self.n_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def mixed_layers(self) -> bool:
    """Whether layers differ in window or RoPE (local / global); then both variants are built and
    each layer picks its own inside the layer scan."""
    kinds = set(self.sliding_layers)
    return len(kinds) > 1

  @property
  def jnp_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = dict(d)
    if isinstance(d.get("rope_scaling"), dict):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("layer_types"), list):
      d["layer_types"] = tuple(d["layer_types"])
    if isinstance(d.get("lora"), dict):
      lora = dict(d["lora"])
      lora["targets"] = tuple(lora.get("targets", ()))
      d["lora"] = LoRAConfig(**lora)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
    return cls(**d)

  def num_params(self, include_embeddings: bool = True) -> int:
    """Parameter count of the base model (no LoRA), computed from shapes."""
    d, hd = self.d_model, self.hd
    attn = d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d
    if self.arch == "gpt2":
      attn += 3 * d + d  # biases
      mlp = 2 * d * self.mlp_dim + self.mlp_dim + d
      norms = 4 * d
    else:
      attn += (hd * (self.n_heads + 2 * self.kv_heads)) if self.qkv_bias else 0
      attn += d if self.o_bias else 0
      mlp = 3 * d * self.mlp_dim + ((2 * self.mlp_dim + d) if self.mlp_bias else 0)
      norms = (4 if self.sandwich_norms else 2) * d + (2 * hd if self.qk_norm else 0)
    per_layer = attn + mlp + norms
    n = self.n_layers * per_layer + (2 * d if self.arch == "gpt2" else d)
    if include_embeddings:
      n += self.vocab_size * d
      if self.arch == "gpt2":
        n += self.max_seq_len * d
      if self.head == "lm" and not self.tie_embeddings:
        n += self.vocab_size * d
    return n

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token (2 * params-in-matmuls + attention), as in the PaLM MFU formula."""
    d, hd = self.d_model, self.hd
    matmul_params = self.n_layers * (
        d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d
        + (2 if self.arch == "gpt2" else 3) * d * self.mlp_dim)
    if self.head == "lm":
      matmul_params += self.vocab_size * d
    attn = 2 * self.n_layers * self.n_heads * hd * seq_len  # QK^T and PV, causal-averaged x2 / 2
    return 2.0 * matmul_params + 2.0 * attn
