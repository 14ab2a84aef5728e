"""`make demo`: the whole PRO pipeline on the embedded synthetic task, on a laptop CPU.

Stages (each an engine run in WORKDIR/<stage>): `sft` (the reference policy, from scratch, on every
candidate response), `adapter` (the preference adapter over the frozen reference's prompt features,
targets w* = softmax(r~(x, y_w) / tau) from the programmatic rewards), `policy` (a weight-conditioned
policy, RiC-style, fine-tuned from the reference), then `eval` (PRO's per-prompt weights against every
fixed weight vector of a simplex grid). Sizes are chosen for < 10 minutes on 2 CPU cores.

    pro-jax demo --workdir runs/demo --config.seed=1 --config.eval.grid_step=0.25
"""

import ml_collections as mc

from pro_jax.configs.base import base_config


def stage(total_steps: int, batch_size: int, lr: float, warmup: int = 20) -> mc.ConfigDict:
  c = base_config()
  c.total_steps = total_steps
  c.batch_size = batch_size
  c.optim.update(lr=lr, warmup_steps=warmup, decay="cosine", end_lr_factor=0.1, weight_decay=0.0)
  c.checkpoint.update(every_steps=max(total_steps, 1), keep=1)
  c.log.update(every_steps=25)
  return c


def get_config():
  c = mc.ConfigDict()
  c.seed = 0
  c.task = mc.ConfigDict(dict(n_train=2048, n_eval=256, n_candidates=6, label_noise=0.05, humor=False))
  # The policy / reference architecture (a tiny Llama trained from scratch on the task's language).
  model = base_config().model
  model.update(vocab_size=0, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=384, max_seq_len=128)
  c.model = model
  c.data = mc.ConfigDict(dict(max_prompt_len=16, max_response_len=48, bucket_multiple=8, template="auto"))
  c.norm = mc.ConfigDict(dict(method="zscore"))
  c.sft = stage(total_steps=300, batch_size=64, lr=3e-3)
  c.adapter = stage(total_steps=300, batch_size=64, lr=3e-3, warmup=10)
  with c.adapter.unlocked():  # targets w* = softmax(r~(x, y_w) / tau); the MLP's width and depth
    c.adapter.pro = mc.ConfigDict(dict(tau=1.0, hidden=256, layers=2))
  c.policy = stage(total_steps=250, batch_size=64, lr=1e-3)
  # conditioning "own": each training response y is conditioned on its own w*(x, y) = softmax(r~ / tau)
  # (PRO_METHOD.md's description). "best_of" (the demo's choice): weights drawn from the whole simplex
  # (Dirichlet(concentration)), each paired with the candidate that maximizes w . r~
  # (`pro_jax.pro.policy.best_of_examples`), `samples` per prompt. With "own", weights near the corners
  # of the simplex never occur in training, so the fixed-weight baselines of the grid would be judged
  # on a policy that never learned what they ask for; "best_of" serves every weight vector equally.
  with c.policy.unlocked():
    c.policy.pro = mc.ConfigDict(dict(loss="ric", conditioning="best_of", tau=1.0, samples=6,
                                      concentration=0.5, decimals=1, max_prompt_len=32))
  c.eval = mc.ConfigDict(dict(grid_step=0.25, max_new_tokens=48, batch_size=256, greedy=True, kl=True,
                              oracle=True))
  c.lock()
  return c
