"""The default configuration every config file starts from (`base_config()`), and its schema.

The returned ConfigDict is LOCKED: a config file or a command-line override that names a key that
does not exist fails at once with a "did you mean" hint; `with config.unlocked():` adds new sections
(later stages add theirs that way). Every field is typed by its default value; overrides are
type-checked against it.

Sections
  model       the trained model (`pro_jax.models.ModelConfig` fields; `lora.rank = 0` = no LoRA)
  mesh        device mesh sizes (data, fsdp, tensor); -1 = all remaining devices
  sharding    logical-axis rules; () = `pro_jax.sharding.RULES`
  distributed `jax.distributed.initialize()` switch for multi-host runs
  optim       AdamW + warmup + cosine / linear / constant decay + global-norm clipping
  loss        which loss the generic `train` command uses ("lm" or the engine's toy "dpo")
  data        the generic `train` command's data ("synthetic", "synthetic_pairs" or a token file)
  guards      non-finite loss / gradient / update: "skip" the update (counted) or "stop" the run;
              max_skipped_fraction: more skipped steps than this fraction fail the run (exit 1)
  checkpoint  Orbax checkpoints: every N steps, keep N, async
  log         metrics every N steps, TensorBoard, Weights & Biases, progress (a bar on a terminal,
              log lines otherwise; `pro_jax.train.progress`)
  profile     a jax.profiler trace of steps start_step .. start_step+num_steps-1 into WORKDIR/profile
"""

from __future__ import annotations

import ml_collections as mc


def model_defaults() -> mc.ConfigDict:
  """`ModelConfig` fields with their defaults (None-valued fields accept any type of value)."""
  return mc.ConfigDict(dict(
      vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
      arch="llama", n_kv_heads=None, head_dim=None, max_seq_len=2048, norm_eps=1e-5,
      rope_theta=10000.0,
      rope_scaling=dict(type="default", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
      qkv_bias=False, tie_embeddings=False, head="lm", num_labels=1, value_head=False,
      dtype="float32", param_dtype="float32", remat="none", scan_layers=True, attention_impl=None,
      pad_token_id=None, bos_token_id=None, eos_token_id=None,
      lora=dict(rank=0, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj")),
  ))


def base_config() -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  c.batch_size = 8  # global: sequences (or pairs) per optimizer step, over all hosts
  c.n_micro = 1  # gradient accumulation: micro-batches of batch_size / n_micro, scanned
  c.trainable = "full"  # "full" | "lora" | "adapter"
  c.model = model_defaults()
  # Frozen reference model for DPO-type losses: "" = none; "policy" = a copy of the initial
  # policy; reference dtype lets it be stored in bf16 (it is never trained).
  c.reference = mc.ConfigDict(dict(source="", param_dtype="bfloat16"))
  c.mesh = mc.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.sharding = mc.ConfigDict(dict(rules=()))
  c.distributed = mc.ConfigDict(dict(initialize="auto", coordinator_address="", num_processes=-1,
                                     process_id=-1))
  c.optim = mc.ConfigDict(dict(
      lr=3e-4, warmup_steps=10, decay="cosine",  # "cosine" | "linear" | "constant"
      end_lr_factor=0.1,  # final lr = lr * end_lr_factor (cosine / linear)
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))  # clip_norm <= 0: off
  c.loss = mc.ConfigDict(dict(name="lm", beta=0.1, concat_pairs=True))  # concat: chosen+rejected in one forward
  c.data = mc.ConfigDict(dict(kind="synthetic", seq_len=64, path="", prompt_len=16))
  # nonfinite: "skip" | "stop"; a run that skipped more than max_skipped_fraction of its steps fails
  c.guards = mc.ConfigDict(dict(nonfinite="skip", max_skipped_fraction=0.1))
  c.checkpoint = mc.ConfigDict(dict(every_steps=50, keep=3, async_save=True))
  # eval_every_steps: held-out loss / metrics under eval/ every N steps and at the end (0: off; the
  # stages hold out their eval split, see docs/stages.md)
  c.log = mc.ConfigDict(dict(every_steps=10, tensorboard=True, wandb_project="", progress=True, eval_every_steps=0))
  c.profile = mc.ConfigDict(dict(start_step=0, num_steps=0))  # 0: off (pro_jax.train.profile)
  c.lock()
  return c
