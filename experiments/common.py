"""Shared builder of the paper-setting configs (helpful_assistant, reddit_summary, ultrafeedback_aspects).

Each setting file defines `get_config(arg="")` through `make_config` here. The argument selects

* the STAGE (`sft`, `rm`, `adapter`, `policy`, `eval`): recorded in the config's ``stage`` field,
  which `pro-jax aot` compiles (the pipeline commands `pro-jax <stage>` ignore it);
* the policy LOSS (`ppo`, `ric`, `modpo`, `wdpo`, `dpo`): the policy section's loss and the
  hyper-parameters that go with it (PPO: the paper's; RiC: the paper's offline setting; DPO-type: ours),
  and the policy's run name ``policy_<loss>`` (so several losses share one workdir);

as ``STAGE``, ``LOSS`` or ``STAGE,LOSS`` (a loss alone means stage policy; no argument = stage policy with
the setting's default loss), optionally followed by ``,OPTION``s, named variants a setting defines (e.g.
helpful_assistant's ``no_humor``). Examples:

    pro-jax aot    --config experiments/helpful_assistant.py:policy --topology v5e:4x4
    pro-jax aot    --config experiments/helpful_assistant.py:modpo --topology v5e:4x4
    pro-jax sft    --config experiments/helpful_assistant.py:sft,ppo --workdir gs://B/hh
    pro-jax policy --config experiments/helpful_assistant.py:ppo --workdir gs://B/hh

The loss changes only the ``policy`` and ``eval`` sections, so the sft / rm / adapter stages of one
workdir are shared by every loss (their engine runs resume, not restart, whatever the argument).

Paths: model directories live under ``$PRO_JAX_MODELS`` (default ``~/models``), raw data under
``$PRO_JAX_DATA`` (default ``~/data``), both resolved on the machine that loads the config (the TPU VM).
See docs/experiments.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import ml_collections as mc

from pro_jax.configs import ConfigError
from pro_jax.configs.pro_base import pro_config

STAGES = ("sft", "rm", "adapter", "policy", "eval")
LOSSES = ("ppo", "ric", "modpo", "wdpo", "dpo")

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json): the architecture AOT compiles; the pipeline reads the
# checkpoint's own config (experiments/preflight.py checks that they agree).
LLAMA2_7B = dict(arch="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008,
                 max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
LLAMA2_DIR = "Llama-2-7b-hf"  # under $PRO_JAX_MODELS; the SFT stage starts from it (or bring an SFT model)
# The paper's LoRA (PRO_METHOD.md): r=64, alpha=128, dropout 0.05 on every linear projection.
LORA = dict(rank=64, alpha=128.0, dropout=0.05,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def models_dir() -> str:
  return os.path.expanduser(os.environ.get("PRO_JAX_MODELS") or "~/models")


def data_dir() -> str:
  return os.path.expanduser(os.environ.get("PRO_JAX_DATA") or "~/data")


def model_path(name: str) -> str:
  return os.path.join(models_dir(), name)


def hf_scorer(directory: str, objective: str) -> str:
  """A scorers entry for an imported HF sequence classifier under $PRO_JAX_MODELS."""
  return f"hf:{model_path(directory)}={objective}"


def parse_arg(arg: str, default_loss: str, options: Sequence[str] = ()) -> tuple[str, str, tuple[str, ...]]:
  """(stage, loss, options) from "", "STAGE", "LOSS", "STAGE,LOSS", each optionally followed by ",OPTION"s
  (the setting's named variants)."""
  stage, loss, opts = "", "", []
  for tok in [t.strip() for t in str(arg or "").replace(":", ",").split(",") if t.strip()]:
    if tok in STAGES and not stage:
      stage = tok
    elif tok in LOSSES and not loss:
      loss = tok
    elif tok in options and tok not in opts:
      opts.append(tok)
    else:
      raise ConfigError(f"config argument {arg!r}: {tok!r} is not a stage {STAGES}, a policy loss {LOSSES}"
                        + (f" or an option of this setting {tuple(options)}" if options else "")
                        + " (expected STAGE, LOSS or STAGE,LOSS[,OPTION...])")
  return stage or "policy", loss or default_loss, tuple(opts)


def tpu_stage(section: mc.ConfigDict, *, total_steps: int, batch_size: int, lr: float, warmup: int,
              lora: bool = True, checkpoint_every: int = 500) -> None:
  """The TPU runtime of a stage: bf16 compute, f32 master weights, full remat, scanned layers, FSDP over
  every chip, LoRA (the paper's) unless `lora=False`, checkpoints every `checkpoint_every` steps."""
  section.total_steps = total_steps
  section.batch_size = batch_size
  section.optim.update(lr=lr, warmup_steps=min(warmup, total_steps))
  section.model.update(dtype="bfloat16", param_dtype="float32", remat="full", scan_layers=True)
  if lora:
    section.trainable = "lora"
    section.model.lora.update(**LORA)
  section.mesh.update(data=1, fsdp=-1, tensor=1)
  section.checkpoint.update(every_steps=min(checkpoint_every, total_steps), keep=2, async_save=True)
  section.log.update(every_steps=25, tensorboard=True, progress=True)


def apply_loss(c: mc.ConfigDict, loss: str, *, max_new_tokens: int, dpo_steps: int, ppo_iterations: int) -> None:
  """The policy section for `loss` (see module doc)."""
  p = c.policy
  p.pro.update(loss=loss, name=f"policy_{loss}", weights_source="adapter", init="stage:sft", reference="stage:sft")
  if loss == "ppo":
    # The paper's PPO: lr 1e-5, batch 64 (rollout prompts), initial KL 0.2, adaptive KL target 3, max grad
    # norm 0.5, temperature 0.7. Ours (unknown in the paper): minibatch 32, 4 PPO epochs, horizon 10000.
    pp = p.pro.ppo
    pp.update(iterations=ppo_iterations, rollout_batch=64, minibatch=32, ppo_epochs=4, max_new_tokens=max_new_tokens,
              temperature=0.7, kl_coef=0.2, adaptive_kl=True, kl_target=3.0, kl_horizon=10000.0)
    steps = pp.iterations * pp.ppo_epochs * (pp.rollout_batch // pp.minibatch)
    tpu_stage(p, total_steps=steps, batch_size=pp.minibatch, lr=1e-5, warmup=0, checkpoint_every=25)
    p.optim.update(decay="constant", clip_norm=0.5)  # run_ppo: checkpoint.every_steps counts iterations
  elif loss == "ric":
    # RiC-style offline conditioning (the paper's offline setting): lr 1.414e-4, 20k steps.
    tpu_stage(p, total_steps=20000, batch_size=64, lr=1.414e-4, warmup=100, checkpoint_every=1000)
    p.pro.update(conditioning="best_of", samples=6, concentration=0.5, decimals=1,
                 max_prompt_len=c.data.max_prompt_len + 32)  # room for the weight text
  else:  # dpo / wdpo / modpo: offline pairs against the SFT model (the LoRA base is the reference)
    tpu_stage(p, total_steps=dpo_steps, batch_size=64, lr=5e-5, warmup=100)
    p.pro.update(beta=0.1, precompute_reference=False)
  p.optim.update(weight_decay=0.0)


def make_config(*, setting: str, arg: str, default_loss: str, objectives: Sequence[str], sources: Sequence[str],
                eval_sources: Sequence[str], manual_dir: str, scorers: Sequence[str], max_prompt_len: int,
                max_response_len: int, max_new_tokens: int, sft_steps: int, dpo_steps: int, ppo_iterations: int,
                customize: Callable[[mc.ConfigDict, str, str], None] | None = None,
                options: dict[str, Callable[[mc.ConfigDict], None]] | None = None) -> mc.ConfigDict:
  """A paper-setting config on `pro_config()` (see the module doc); `customize(c, stage, loss)`, then the
  selected `options` (name -> function editing the config), last."""
  options = dict(options or {})
  stage, loss, chosen = parse_arg(arg, default_loss, tuple(options))
  c = pro_config()
  with c.unlocked():
    c.stage = stage
    c.setting = setting
    c.options = chosen
  c.seed = 0
  c.objectives = tuple(objectives)
  c.data.update(sources=tuple(sources), eval_sources=tuple(eval_sources), manual_dir=manual_dir, data_dir="",
                mode="lenient", max_prompt_len=max_prompt_len, max_response_len=max_response_len,
                bucket_multiple=128, template="auto", max_eval=500)
  c.tokenizer = model_path(LLAMA2_DIR)
  c.model.update(**LLAMA2_7B)
  c.scorers = tuple(scorers)
  c.norm.method = "zscore"
  # stage 0: SFT of Llama-2-7B on the preferred responses (LoRA; the merged result is the reference)
  c.sft.pro.update(source=f"hf:{model_path(LLAMA2_DIR)}", responses="chosen")
  tpu_stage(c.sft, total_steps=sft_steps, batch_size=64, lr=1.414e-4, warmup=100)
  # stage 1 (only when scorers use "rm"): K heads on the SFT backbone, LoRA
  c.rm.pro.update(source="stage:sft", objectives=())
  tpu_stage(c.rm, total_steps=2000, batch_size=64, lr=5e-5, warmup=100)
  # stages 2-4: the adapter over the frozen SFT model's prompt features (not LoRA: the MLP trains fully)
  c.adapter.pro.update(backbone="stage:sft", tau=1.0, hidden=256, layers=2)
  tpu_stage(c.adapter, total_steps=2000, batch_size=64, lr=3e-3, warmup=50, lora=False)
  c.adapter.trainable = "full"
  apply_loss(c, loss, max_new_tokens=max_new_tokens, dpo_steps=dpo_steps, ppo_iterations=ppo_iterations)
  c.eval.update(grid_step=0.25, max_new_tokens=max_new_tokens, batch_size=64, greedy=True, max_prompts=500,
                policies=())
  if customize is not None:
    customize(c, stage, loss)
  for name in chosen:
    options[name](c)
  c.lock()
  return c


__all__ = ["make_config", "parse_arg", "apply_loss", "tpu_stage", "hf_scorer", "model_path", "models_dir",
           "data_dir", "STAGES", "LOSSES", "LLAMA2_7B", "LLAMA2_DIR", "LORA"]
