"""`make demo`: the whole PRO pipeline on the embedded synthetic task, on a laptop CPU.

Stages (each an engine run in WORKDIR/<stage>): `sft` (the reference policy, from scratch, on every
candidate response), `adapter` (the preference adapter over the frozen reference's prompt features,
targets w* = softmax(r~(x, y_w) / tau) from the programmatic rewards), `policy` (a weight-conditioned
policy, RiC-style, fine-tuned from the reference), then `eval` (PRO's per-prompt weights against every
fixed weight vector of a simplex grid). Sizes are chosen for < 10 minutes on 2 CPU cores.

    pro-jax demo --workdir runs/demo --config.seed=1 --config.eval.grid_step=0.1
"""

from pro_jax.configs.pro_base import pro_config


def get_config():
  c = pro_config()
  c.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=384, max_seq_len=128)
  c.data.update(max_prompt_len=16, max_response_len=48, bucket_multiple=8)
  c.task.update(n_valid=128)  # validation prompts (disjoint from train and eval) pick a fixed vector too
  c.sft.update(total_steps=300, batch_size=64)
  c.adapter.update(total_steps=300, batch_size=64)
  # conditioning "own": each training response y is conditioned on its own w*(x, y) = softmax(r~ / tau)
  # (PRO_METHOD.md's description). "best_of" (the demo's choice): weights drawn from the whole simplex
  # (Dirichlet(concentration)), each paired with the candidate that maximizes w . r~
  # (`pro_jax.stages.policy.best_of_examples`), `samples` per prompt. With "own", weights near the corners
  # of the simplex never occur in training, so the fixed-weight baselines of the grid would be judged
  # on a policy that never learned what they ask for; "best_of" serves every weight vector equally.
  c.policy.update(total_steps=250, batch_size=64)
  c.policy.pro.update(loss="ric", conditioning="best_of", max_prompt_len=32)
  c.eval.update(grid_step=0.1, max_new_tokens=48, batch_size=256)  # 66 fixed weight vectors
  c.lock()
  return c
