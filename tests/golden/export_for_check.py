"""Manual export check, side 1 (pro_jax venv): write save_hf_model exports + pro_jax's outputs.

    .venv/bin/python tests/golden/export_for_check.py /tmp/export_check
    /tmp/torchvenv/bin/python tests/golden/make_golden.py --check-export /tmp/export_check

Exports every golden fixture (weights scaled by 1.01 so the files are not the fixture's bytes; the
sharded one sharded again), a LoRA-merged Llama, a new score head on a Qwen2 LM, GPT-2 written as
bf16, and stories260K with its tokenizer; each DIR/<name>/ gets an `ours.npz` (tokens, mask,
positions, pro_jax's logits or scores) that make_golden.py compares with transformers' forward.
Not part of the test suite.
"""
import os, pathlib, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import numpy as np, jax, jax.numpy as jnp
from pro_jax.models.hf_io import load_hf_model, save_hf_model
from pro_jax.models.config import LoRAConfig
from pro_jax.models.transformer import abstract_variables
from pro_jax.models.llama2c import load_llama2c
F = pathlib.Path(__file__).resolve().parent / "fixtures"
OUT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/export_check")
STORIES = pathlib.Path(os.environ.get("PRO_JAX_SHARED_DATA", pathlib.Path(__file__).resolve().parents[3] / "shared" / "data")) / "models" / "stories260K"

def ours(model, params, g, lora=None):
  v = {"params": params} if lora is None else {"params": params, "lora": lora}
  out = jax.jit(lambda v, t, m: model.apply(v, t, m))(v, jnp.asarray(g["tokens"]), jnp.asarray(g["mask"]))
  return {"logits": np.asarray(out.logits)} if model.config.head == "lm" else {"scores": np.asarray(out.scores)}

def dump(name, model, params, g, lora=None, **kw):
  d = save_hf_model(OUT / name, model, params, lora=lora, **kw)
  np.savez(d / "ours.npz", tokens=g["tokens"], mask=g["mask"], positions=g["positions"], **ours(model, params, g, lora))

for name in sorted(p.name for p in F.iterdir()):
  model, params = load_hf_model(F / name); g = np.load(F / name / "golden.npz")
  # perturb weights so the export is not just the fixture's bytes
  params = jax.tree.map(lambda x: x * 1.01, params)
  dump(name, model, params, g, max_shard_size="40KB" if "sharded" in name else "5GB")
# LoRA merged export
name = "llama_rope_linear_bias"; g = np.load(F / name / "golden.npz")
model, params = load_hf_model(F / name, lora=LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj", "up_proj")))
rng = np.random.default_rng(0)
lora = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), abstract_variables(model)["lora"])
dump("llama_lora_merged", model, params, g, lora=lora)
# a reward model (new score head) from a causal LM, and bf16 files
model, params = load_hf_model(F / "qwen2_gqa_tied", head="score", num_labels=2, pad_token_id=0)
g = np.load(F / "qwen2_cls1" / "golden.npz")
dump("qwen2_new_score_head", model, params, g)
model, params = load_hf_model(F / "gpt2_lm", param_dtype="bfloat16")
g = np.load(F / "gpt2_lm" / "golden.npz")
dump("gpt2_bf16_params", model, jax.tree.map(lambda x: x.astype(jnp.float32), params) , g, dtype="bfloat16")
# stories260K
model, params, tok = load_llama2c(STORIES / "stories260K.bin")
rows = [tok(s)["input_ids"] for s in ["Once upon a time, there was a big dog.", "Lily saw a ball."]]
n = max(map(len, rows))
t = np.array([[0] * (n - len(r)) + r for r in rows], np.int32); m = (np.arange(n)[None] >= (n - np.array([len(r) for r in rows]))[:, None]).astype(np.int32)
g = dict(tokens=t, mask=m, positions=np.maximum(np.cumsum(m, -1) - 1, 0))
dump("stories260K", model, params, g, tokenizer=tok)
print("written", sorted(p.name for p in OUT.iterdir()))
