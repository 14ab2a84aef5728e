"""Llama-2-7B policy + frozen bf16 reference, DPO-type step, FSDP over all chips (for `pro-jax aot`).

  pro-jax aot --config llama2_7b_dpo --topology v5e:4x4
  pro-jax aot --config llama2_7b_dpo --topology v5p:2x2x2

Full fine-tuning of the policy (float32 master weights + AdamW state, bfloat16 compute, rematerialized
layers); the reference is a bfloat16 copy that only runs forward. Figures and the settings tried are
in docs/training.md.
"""

from pro_jax.configs.base import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                 mlp_dim=11008, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0,
                 dtype="bfloat16", param_dtype="float32", remat="full", bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)
  c.reference.update(source="policy", param_dtype="bfloat16")
  c.loss.update(name="dpo", beta=0.1, concat_pairs=True)
  c.data.update(kind="synthetic_pairs", seq_len=512, prompt_len=128)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.batch_size = 96  # pairs per step (192 sequences through the policy and the reference); see docs/training.md
  c.n_micro = 1
  c.total_steps = 1000
  c.optim.update(lr=5e-7, warmup_steps=100, decay="cosine", end_lr_factor=0.0, b2=0.999,
                 weight_decay=0.0, clip_norm=1.0)
  c.checkpoint.update(every_steps=200, keep=2)
  return c
