"""Manual export check, side 1 (pro_jax venv): write save_hf_model exports + pro_jax's outputs.

    .venv/bin/python tests/golden/export_for_check.py /tmp/export_check
    /tmp/torchvenv/bin/python tests/golden/make_golden.py --check-export /tmp/export_check

Exports every golden fixture (weights scaled by 1.01 so the files are not the fixture's bytes; the
sharded one sharded again), a LoRA-merged Llama, a new score head on a Qwen2 LM, GPT-2 written as
bf16, new score heads on Qwen3 and Gemma 3 LMs, Gemma 2 written as bf16, and stories260K with its
tokenizer; each DIR/<name>/ gets an `ours.npz` (tokens, mask,
positions, pro_jax's logits or scores) that make_golden.py compares with transformers' forward.
Not part of the test suite.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.models.config import LoRAConfig
from pro_jax.models.hf_io import load_hf_model, save_hf_model
from pro_jax.models.llama2c import load_llama2c
from pro_jax.models.transformer import abstract_variables

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SHARED = pathlib.Path(os.environ.get("PRO_JAX_SHARED_DATA",
                                    pathlib.Path(__file__).resolve().parents[3] / "shared/data"))


def outputs(model, params, g, lora=None) -> dict:
  v = {"params": params} if lora is None else {"params": params, "lora": lora}
  out = jax.jit(lambda v, t, m: model.apply(v, t, m))(v, jnp.asarray(g["tokens"]), jnp.asarray(g["mask"]))
  return {"logits": np.asarray(out.logits)} if model.config.head == "lm" else {"scores": np.asarray(out.scores)}


def dump(out_dir: pathlib.Path, model, params, g, lora=None, **kw) -> None:
  d = save_hf_model(out_dir, model, params, lora=lora, **kw)
  np.savez(d / "ours.npz", tokens=g["tokens"], mask=g["mask"], positions=g["positions"],
           **outputs(model, params, g, lora))


def main(out: pathlib.Path) -> None:
  for name in sorted(p.name for p in FIXTURES.iterdir()):
    model, params = load_hf_model(FIXTURES / name)
    g = np.load(FIXTURES / name / "golden.npz")
    params = jax.tree.map(lambda x: x * 1.01, params)  # not just the fixture's bytes
    dump(out / name, model, params, g, max_shard_size="40KB" if "sharded" in name else "5GB")

  g = np.load(FIXTURES / "llama_rope_linear_bias" / "golden.npz")
  lora_cfg = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj", "up_proj"))
  model, params = load_hf_model(FIXTURES / "llama_rope_linear_bias", lora=lora_cfg)
  rng = np.random.default_rng(0)
  lora = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), abstract_variables(model)["lora"])
  dump(out / "llama_lora_merged", model, params, g, lora=lora)

  model, params = load_hf_model(FIXTURES / "qwen2_gqa_tied", head="score", num_labels=2, pad_token_id=0)
  dump(out / "qwen2_new_score_head", model, params, np.load(FIXTURES / "qwen2_cls1" / "golden.npz"))

  for lm, cls in [("qwen3_gqa_untied", "qwen3_cls2"), ("gemma3_pattern_untied", "gemma3_cls3")]:
    model, params = load_hf_model(FIXTURES / lm, head="score", num_labels=2, pad_token_id=0)
    dump(out / f"{lm.split('_')[0]}_new_score_head", model, params, np.load(FIXTURES / cls / "golden.npz"))

  model, params = load_hf_model(FIXTURES / "gemma2_swa_softcap", param_dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  dump(out / "gemma2_bf16_params", model, params, np.load(FIXTURES / "gemma2_swa_softcap" / "golden.npz"),
       dtype="bfloat16")

  model, params = load_hf_model(FIXTURES / "gpt2_lm", param_dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # bf16 values; the files are bf16 again
  dump(out / "gpt2_bf16_params", model, params, np.load(FIXTURES / "gpt2_lm" / "golden.npz"), dtype="bfloat16")

  model, params, tok = load_llama2c(SHARED / "models" / "stories260K" / "stories260K.bin")
  rows = [tok(s)["input_ids"] for s in ["Once upon a time, there was a big dog.", "Lily saw a ball."]]
  n = max(map(len, rows))
  tokens = np.array([[0] * (n - len(r)) + r for r in rows], np.int32)  # left-padded
  mask = np.array([[0] * (n - len(r)) + [1] * len(r) for r in rows], np.int32)
  g = dict(tokens=tokens, mask=mask, positions=np.maximum(np.cumsum(mask, -1) - 1, 0))
  dump(out / "stories260K", model, params, g, tokenizer=tok)
  print("written", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/export_check"))
