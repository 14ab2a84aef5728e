"""Golden fixtures: tiny random PyTorch `transformers` models and their fp32 logits / scores.

NOT part of the test suite and NOT a dependency of pro_jax: it needs torch + transformers, which live
in a separate virtual environment. Regenerate (from the repository root):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 "transformers==5.24.0" safetensors numpy
    /tmp/torchvenv/bin/python tests/golden/make_golden.py            # rewrites tests/golden/fixtures/

(torch==2.13.0 exactly: a CPU wheel; anything else downloads a multi-GB CUDA build.)

Every fixture directory holds what `save_pretrained(safe_serialization=True)` wrote (config.json,
model.safetensors or sharded model-0000x-of-0000y.safetensors + model.safetensors.index.json) and
`golden.npz` with
  tokens [B, L] int32, mask [B, L] int32 (1 real, 0 pad; causal LMs have LEFT-padded rows, classifiers
  right- and left-padded rows, pad tokens = pad_token_id = 0 and never used as a real token),
  positions [B, L] (HF-style position_ids = clamp(cumsum(mask) - 1, 0), passed to the torch model),
  logits [B, L, V] (causal LMs) or scores [B, num_labels] (classifiers), float32, from the eager
  fp32 torch forward (and logits_bf16: the bf16 torch forward, where a fixture asks for it), and inv_freq [head_dim / 2] (HF's RoPE inverse frequencies, Llama family;
  Gemma 3: the global layers', plus inv_freq_local for the sliding layers).
All weights (norm scales and biases included) are re-drawn at a scale that makes logits O(1-10), so a
wrong mapping cannot hide behind a near-zero output. `tests/test_hf_io.py` checks pro_jax against them.

Second mode, a manual export check (not in the test suite):

    /tmp/torchvenv/bin/python tests/golden/make_golden.py --check-export DIR

loads every DIR/<name>/ written by `pro_jax.save_hf_model` (with an `ours.npz` holding tokens, mask,
positions and pro_jax's logits or scores; `.venv/bin/python tests/golden/export_for_check.py DIR`
writes them) through `transformers` Auto classes and prints the max difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import shutil

import numpy as np
import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Gemma2Config, Gemma2ForCausalLM,
                          Gemma2ForSequenceClassification, Gemma3ForCausalLM, Gemma3TextConfig,
                          Gemma3TextForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2ForSequenceClassification, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3ForSequenceClassification)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
PAD = 0

# name -> (model class, config class, config kwargs, extra: seq_len, causal, dtype, shard size)
SPECS = {
    "llama_gqa_untied": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=64,
        rms_norm_eps=1e-5), dict(seq_len=12)),
    "llama_tied_sharded": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), dict(seq_len=12, shard="40KB")),
    "llama_rope_llama3": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128}), dict(seq_len=32)),
    "llama_rope_linear_bias": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64, attention_bias=True,
        mlp_bias=True, rope_parameters={"rope_type": "linear", "rope_theta": 100.0, "factor": 4.0}),
        dict(seq_len=32)),
    "qwen2_gqa_tied": (Qwen2ForCausalLM, Qwen2Config, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), dict(seq_len=12)),
    "mistral_swa_bf16": (MistralForCausalLM, MistralConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), dict(seq_len=12, dtype=torch.bfloat16)),
    "gpt2_lm": (GPT2LMHeadModel, GPT2Config, dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2),
        dict(seq_len=12)),
    "gpt2_cls1": (GPT2ForSequenceClassification, GPT2Config, dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=1, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2),
        dict(seq_len=10, causal=False)),
    "gpt2_cls3": (GPT2ForSequenceClassification, GPT2Config, dict(
        vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_inner=48, n_positions=32, num_labels=3,
        pad_token_id=PAD, layer_norm_epsilon=1e-6, bos_token_id=1, eos_token_id=2), dict(seq_len=10, causal=False)),
    "llama_cls2": (LlamaForSequenceClassification, LlamaConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=2, pad_token_id=PAD),
        dict(seq_len=10, causal=False)),
    "qwen2_cls1": (Qwen2ForSequenceClassification, Qwen2Config, dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=PAD),
        dict(seq_len=10, causal=False)),
    # Qwen3: q/k RMSNorm per head, head_dim independent of hidden / heads (4 x 16 = 64 != 32).
    "qwen3_gqa_untied": (Qwen3ForCausalLM, Qwen3Config, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), dict(seq_len=12)),
    "qwen3_tied": (Qwen3ForCausalLM, Qwen3Config, dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), dict(seq_len=12)),
    "qwen3_cls2": (Qwen3ForSequenceClassification, Qwen3Config, dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, num_labels=2, pad_token_id=PAD),
        dict(seq_len=10, causal=False)),
    # Gemma 2: (1 + w) norms, sqrt(d) embedding scale, GeGLU, sandwich norms, attention / final soft-caps
    # small enough to bite, query_pre_attn_scalar != head_dim, alternating local (window 4 < 12) / global.
    "gemma2_swa_softcap": (Gemma2ForCausalLM, Gemma2Config, dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0, final_logit_softcapping=8.0, sliding_window=4, pad_token_id=PAD,
        bos_token_id=2, eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        dict(seq_len=12, bf16_ref=True)),
    "gemma2_cls1": (Gemma2ForSequenceClassification, Gemma2Config, dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=30.0, sliding_window=3, num_labels=1,
        pad_token_id=PAD), dict(seq_len=10, causal=False)),
    # Gemma 3: q/k norm, 5 local : 1 global layers (the default pattern), local theta 10000, global
    # theta 1e6 with linear scaling (as Gemma 3 4B+), window 4 < 12, untied head.
    "gemma3_pattern_untied": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=16,
        sliding_window=4, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=2, eos_token_id=1,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
        dict(seq_len=12, bf16_ref=True)),
    "gemma3_cls3": (Gemma3TextForSequenceClassification, Gemma3TextConfig, dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, query_pre_attn_scalar=8,
        sliding_window=3, layer_types=["sliding_attention", "full_attention"], num_labels=3, pad_token_id=PAD,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}}),
        dict(seq_len=10, causal=False)),
}

# Seeds: the original fixtures keep theirs (their index in the sorted list of the first eleven names).
_ORIGINAL = sorted(["llama_gqa_untied", "llama_tied_sharded", "llama_rope_llama3", "llama_rope_linear_bias",
                    "qwen2_gqa_tied", "mistral_swa_bf16", "gpt2_lm", "gpt2_cls1", "gpt2_cls3", "llama_cls2",
                    "qwen2_cls1"])
SEEDS = {name: i for i, name in enumerate(_ORIGINAL + [n for n in SPECS if n not in _ORIGINAL])}


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Re-draw every parameter: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 0.5^2), norm scales
  ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.1^2). Tied weights are drawn once (named_parameters dedups)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      shape = p.shape
      if name.endswith("bias"):
        val = 0.1 * torch.randn(shape, generator=gen)
      elif "norm" in name or ".ln_" in name or name.startswith("ln_"):
        val = 1.0 + 0.2 * torch.randn(shape, generator=gen)
      elif "embed_tokens" in name or "wte" in name or "wpe" in name:
        val = 0.5 * torch.randn(shape, generator=gen)
      else:  # nn.Linear [out, in] or GPT-2 Conv1D [in, out]: scale by the hidden size
        val = torch.randn(shape, generator=gen) / math.sqrt(model.config.hidden_size)
      p.copy_(val)


def make_inputs(seq_len: int, vocab: int, causal: bool, rng: np.random.Generator):
  """tokens / mask [3, L]: a full row and padded rows (left for causal LMs; right + left for classifiers)."""
  B = 3
  tokens = rng.integers(1, vocab, size=(B, seq_len)).astype(np.int32)  # 0 = pad, never a real token
  mask = np.ones((B, seq_len), np.int32)
  if causal:
    mask[1, :3] = 0  # left padding
    mask[2, :seq_len - 2] = 0  # a short, heavily left-padded row
  else:
    mask[1, seq_len - 3:] = 0  # right padding
    mask[2, :2] = 0  # left padding
  tokens = np.where(mask == 1, tokens, PAD).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def torch_forward(model, tokens, mask, positions, causal: bool) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(positions).long())
  return out.logits.float().numpy()


def build(name: str) -> None:
  cls, cfg_cls, cfg_kw, extra = SPECS[name]
  seed = SEEDS[name]
  torch.manual_seed(seed)
  cfg = cfg_cls(**cfg_kw)
  model = cls(cfg).eval()
  model.set_attn_implementation("eager")
  randomize_(model, torch.Generator().manual_seed(1000 + seed))
  dtype = extra.get("dtype", torch.float32)
  if dtype != torch.float32:  # round the weights (not the RoPE buffers) to dtype; golden logits in fp32
    with torch.no_grad():
      for p in model.parameters():
        p.copy_(p.to(dtype).to(torch.float32))
  causal = extra.get("causal", True)
  tokens, mask, positions = make_inputs(extra["seq_len"], cfg.vocab_size, causal, np.random.default_rng(seed))
  out = torch_forward(model, tokens, mask, positions, causal)
  arrays = dict(tokens=tokens, mask=mask, positions=positions)
  arrays["logits" if causal else "scores"] = out.astype(np.float32)
  if extra.get("bf16_ref"):  # transformers' own bf16 forward (weights and compute), for bf16 tolerances
    arrays["logits_bf16"] = torch_forward(copy.deepcopy(model).to(torch.bfloat16), tokens, mask, positions, causal)
  rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
  if rotary is not None and hasattr(rotary, "full_attention_inv_freq"):  # Gemma 3: per layer type
    arrays["inv_freq"] = rotary.full_attention_inv_freq.float().numpy()
    arrays["inv_freq_local"] = rotary.sliding_attention_inv_freq.float().numpy()
  elif rotary is not None:
    arrays["inv_freq"] = rotary.inv_freq.float().numpy()
  out_dir = FIXTURES / name
  if out_dir.exists():
    shutil.rmtree(out_dir)
  save_kw = {}
  if "shard" in extra:
    save_kw["max_shard_size"] = extra["shard"]
  model.to(dtype).save_pretrained(out_dir, safe_serialization=True, **save_kw)
  np.savez(out_dir / "golden.npz", **arrays)
  real = mask.astype(bool)
  mag = np.abs(out[real]).max() if causal else np.abs(out).max()
  size = sum(f.stat().st_size for f in out_dir.iterdir())
  print(f"{name:24s} {cls.__name__:34s} max|out| {mag:7.3f}  {size / 1024:7.1f} KiB")


def check_export(root: pathlib.Path) -> None:
  """Load each pro_jax export under root with transformers and compare to pro_jax's outputs."""
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  print(f"{'export':28s} {'architecture':34s} {'max|diff|':>10s} {'max|out|':>9s}")
  worst = 0.0
  for d in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
    ours = np.load(d / "ours.npz")
    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    causal = "SequenceClassification" not in arch
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(model).__name__ == arch, (type(model).__name__, arch)
    out = torch_forward(model, ours["tokens"], ours["mask"], ours["positions"], causal)
    ref = ours["logits" if causal else "scores"]
    diff = np.abs(out - ref)[ours["mask"].astype(bool)] if causal else np.abs(out - ref)
    worst = max(worst, float(diff.max()))
    print(f"{d.name:28s} {arch:34s} {diff.max():10.2e} {np.abs(ref).max():9.3f}")
  print(f"worst max|diff| {worst:.2e}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check-export", type=pathlib.Path, default=None)
  parser.add_argument("--only", nargs="*", default=None)
  args = parser.parse_args()
  torch.set_num_threads(1)
  if args.check_export is not None:
    check_export(args.check_export)
    return
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  FIXTURES.mkdir(parents=True, exist_ok=True)
  for name in args.only or SPECS:
    build(name)
  total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
  print(f"total {total / 1024:.1f} KiB")


if __name__ == "__main__":
  main()
