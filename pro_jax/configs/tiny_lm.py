"""A tiny Llama-style language model on synthetic tokens: CPU tests and the engine's smoke run.

  pro-jax train --config tiny_lm --workdir /tmp/tiny --config.total_steps=50
"""

from pro_jax.configs.base import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                 max_seq_len=64)
  c.data.update(kind="synthetic", seq_len=32)
  c.batch_size = 8
  c.total_steps = 20
  c.optim.update(lr=3e-3, warmup_steps=2, decay="cosine")
  c.checkpoint.update(every_steps=5, keep=3)
  c.log.update(every_steps=5)
  return c
