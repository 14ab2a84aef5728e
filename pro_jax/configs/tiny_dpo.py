"""A tiny DPO-type step (policy + frozen reference on chosen / rejected pairs): CPU tests, AOT test.

Uses the engine's toy sigmoid-DPO loss (`pro_jax.train.losses.toy_dpo_loss`) on synthetic pairs.
"""

from pro_jax.configs.base import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_dim=128, max_seq_len=64,
                 dtype="bfloat16", remat="full")
  c.reference.update(source="policy", param_dtype="bfloat16")
  c.loss.update(name="dpo", beta=0.1, concat_pairs=True)
  c.data.update(kind="synthetic_pairs", seq_len=32, prompt_len=8)
  c.batch_size = 8
  c.total_steps = 10
  c.optim.update(lr=1e-4, warmup_steps=2, decay="linear", end_lr_factor=0.0)
  c.checkpoint.update(every_steps=5, keep=2)
  return c
