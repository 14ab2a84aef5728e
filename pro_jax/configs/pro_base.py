"""The PRO pipeline's config schema (`pro_config()`); `demo` and the experiments start from it.

See `pro_jax/stages/pipeline.py` for what each section does. Stage sections (`sft`, `rm`, `adapter`,
`policy`) are full engine configs (`base.base_config()`: batch, steps, optimizer, mesh, checkpoints,
logging, model dtypes / LoRA) plus a `pro` section with the stage's PRO settings.
"""

import ml_collections as mc

from pro_jax.configs.base import base_config


def stage(total_steps: int, batch_size: int, lr: float, warmup: int = 20, **pro) -> mc.ConfigDict:
  c = base_config()
  c.total_steps = total_steps
  c.batch_size = batch_size
  c.optim.update(lr=lr, warmup_steps=min(warmup, total_steps), decay="cosine", end_lr_factor=0.1,
                 weight_decay=0.0)
  c.checkpoint.update(every_steps=max(total_steps, 1), keep=1)
  c.log.update(every_steps=25)
  with c.unlocked():
    c.pro = mc.ConfigDict(pro)
  return c


def pro_config() -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.seed = 0
  c.distributed = base_config().distributed  # jax.distributed.initialize() for multi-host runs
  c.objectives = ("concise", "informative", "harmless")
  c.data = mc.ConfigDict(dict(
      sources=("synthetic",),  # "synthetic" or "BUILDER/CONFIG:SPLIT", e.g. "hh_rlhf/helpful-base:train"
      eval_sources=(),  # empty: hold out eval_fraction of the sources' rows
      # max_eval / max_train (real sources): > 0 = a seeded sample of that many eval / training rows; 0 = all
      eval_fraction=0.1, max_eval=0, max_train=0,
      manual_dir="", data_dir="", mode="lenient",  # raw files (tfds manual_dir) or prepared data_dir
      max_prompt_len=256, max_response_len=256, bucket_multiple=128, template="auto"))
  # the embedded task: eval prompts are (creature, template) combinations never seen in training
  # (eval_fraction of them); n_valid > 0 adds a validation split from its own valid_fraction.
  c.task = mc.ConfigDict(dict(n_train=2048, n_eval=256, n_valid=0, eval_fraction=0.2, valid_fraction=0.1,
                              n_candidates=6, label_noise=0.05, humor=False))
  c.tokenizer = ""  # "" = the synthetic task's own; a HF tokenizer directory or a SentencePiece .model
  c.model = base_config().model  # architecture of "scratch" sources (vocab_size 0 = the tokenizer's)
  c.model.vocab_size = 0
  c.scorers = ("synthetic",)  # "synthetic" | "rm" (the rm stage) | "hf:DIR=OBJECTIVE"
  c.norm = mc.ConfigDict(dict(method="zscore"))  # zscore | minmax | quantile
  # source: "scratch" | "checkpoint:DIR" | "hf:DIR" | "llama2c:FILE"; responses: "responses" (every
  # scored response) or "chosen".
  c.sft = stage(300, 64, 3e-3, source="scratch", responses="responses")
  # objectives: the heads to train (pairs speak for them through pair_objectives); () = all.
  c.rm = stage(300, 32, 1e-4, source="stage:sft", objectives=())
  # targets w* = softmax(r~(x, y_w) / tau); features of the frozen `backbone`; MLP width / depth.
  c.adapter = stage(300, 64, 3e-3, warmup=10, backbone="stage:sft", tau=1.0, hidden=256, layers=2)
  # name: the run's subdirectory of the workdir (several policies, e.g. one per fixed weight, side by side);
  # loss: sft | ric | dpo | wdpo | modpo | ppo; weights_source: target | adapter | uniform | fixed:[...]
  # (ric conditions on the weights instead: its training data carries them, see `conditioning`).
  c.policy = stage(
      250, 64, 1e-3, name="policy", loss="ric", weights_source="adapter", init="stage:sft", reference="stage:sft",
      beta=0.1, dpo_loss_type="sigmoid", label_smoothing=0.0,  # dpo: TRL's loss_type (sigmoid | ipo | hinge), cDPO
      tau=1.0, precompute_reference=False,
      conditioning="best_of", samples=6, concentration=0.5, decimals=1, max_prompt_len=288,
      conditioning_mode="text", soft_tokens=4,  # ric: weights as text, or as soft tokens (learned embeddings)
      # conditioning "rewards": RiC proper, each response conditioned on its own normalized rewards
      # ("<r> name value ... </r>"); weights are mapped to target rewards by RiC's map (l2 | linear | linf)
      ric_reward_map="l2",
      # MORLHF-PPO (loss "ppo"): pro_jax.stages.ppo.PPOConfig; the policy's engine optim holds
      # lr / clip_norm (the paper: 1e-5, 0.5); reward_clip <= 0 = off.
      ppo=mc.ConfigDict(dict(iterations=100, rollout_batch=64, minibatch=16, ppo_epochs=4, max_new_tokens=128,
                             temperature=0.7, top_k=0, top_p=1.0, kl_coef=0.2, adaptive_kl=True, kl_target=3.0,
                             kl_horizon=10000.0, gamma=1.0, lam=0.95, whiten_advantages=True, clip_eps=0.2,
                             vf_coef=0.1, vf_clip=0.2, entropy_coef=0.0, reward_clip=0.0)))
  # kl: KL(pi || pi_ref) estimated from kl_samples temperature-1 samples per prompt of pi (plus the
  # log-ratio of the evaluated responses, named for what it is); hv_reference: the hypervolume's
  # reference point on the normalized scale (one value for every objective, or K values), fixed
  # across seeds and settings; the best fixed vector is also picked on the validation split
  # (the data's, when it has one: task.n_valid > 0).
  c.eval = mc.ConfigDict(dict(grid_step=0.25, max_new_tokens=128, batch_size=64, greedy=True, temperature=1.0,
                              kl=True, kl_samples=1, oracle=True, utility_weights="true", max_prompts=0,
                              hv_reference=(-2.0,), max_valid_prompts=0,
                              policies=()))  # policy run names to compare; () = policy.pro.name
  return c


def get_config():
  """The schema's defaults (the embedded task at library-default sizes); start your own from here."""
  c = pro_config()
  c.lock()
  return c
