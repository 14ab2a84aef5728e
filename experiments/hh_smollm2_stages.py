"""The real-model HH-RLHF setting as a PRO stage workdir, CPU-sized: SmolLM2-135M-Instruct (GGUF) through
the library's own stage runners, so `pro-jax generate` / `pro_jax.load_pro` can use the result.

    G=$PRO_JAX_SHARED_DATA/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf   # or set PRO_JAX_SMOLLM2
    pro-jax rm      --config experiments/hh_smollm2_stages.py --workdir runs/smol   # 2-head reward model (LoRA)
    pro-jax adapter --config experiments/hh_smollm2_stages.py --workdir runs/smol   # norm.json, targets, adapter
    pro-jax policy  --config experiments/hh_smollm2_stages.py --workdir runs/smol   # RiC-style LoRA policy
    pro-jax generate --workdir runs/smol --prompt "How do I pick a lock?" [--weights 0.2,0.8]

Every stage starts from the GGUF file (`gguf:FILE` sources: no SFT stage; the instruct model is the
reference): the reward model is SmolLM2 + a 2-head score head (helpful, harmless; masked
Bradley-Terry: helpful-base pairs speak for helpful, harmless-base for harmless), LoRA r=8 with the
head trained fully; the adapter is the MLP over the frozen SmolLM2's mean-pooled prompt features; the
policy is SmolLM2 + LoRA r=8 trained RiC-style (`best_of` weights as text after the last user turn).
The tokenizer and ChatML template are the GGUF file's own.

Data: the HH-RLHF helpful-base and harmless-base TEST files (the only HH files in shared/data), 10%
held out; `data.max_train` rows of the rest (a seeded sample of both files). The sizes (a few LoRA
steps, 64-token prompts, 96-token responses) are for a ~10-minute run on 2 shared CPU cores: the
point is a complete, loadable PRO workdir on a real chat model, not a trained one (for the
experiment's numbers see experiments/hh_smollm2.py and docs/results.md). Scale with overrides,
e.g. `--config.data.max_train=2000 --config.policy.total_steps=500`; experiments/hh_smollm2_tpu.py is
the TPU-size version (Llama-2-7B).

Paths: the GGUF file is $PRO_JAX_SMOLLM2 if set, else
$PRO_JAX_SHARED_DATA/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf, else
$PRO_JAX_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf (docs/gguf.md: getting the file); the HH-RLHF files
under $PRO_JAX_SHARED_DATA/hh_rlhf, else $PRO_JAX_DATA/hh-rlhf (``helpful-base/test.jsonl.gz``, ...).
Argument (experiments/common.py): STAGE, LOSS or STAGE,LOSS; default loss ric.
"""

import os
import pathlib

from pro_jax.configs import load_module_file


def _common():
  return load_module_file(pathlib.Path(__file__).with_name("common.py"), "_pro_jax_experiments_common")


SETTING = "hh_smollm2_stages"
OBJECTIVES = ("helpful", "harmless")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = dict(rank=8, alpha=16.0, dropout=0.0,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def gguf_path() -> str:
  if os.environ.get("PRO_JAX_SMOLLM2"):
    return os.path.expanduser(os.environ["PRO_JAX_SMOLLM2"])
  shared = os.environ.get("PRO_JAX_SHARED_DATA")
  if shared:
    return os.path.join(os.path.expanduser(shared), "models", "smollm2-135m-instruct", GGUF_NAME)
  return _common().model_path(GGUF_NAME)


def hh_dir() -> str:
  shared = os.environ.get("PRO_JAX_SHARED_DATA")
  if shared:
    return os.path.join(os.path.expanduser(shared), "hh_rlhf")
  return _common().data_dir() + "/hh-rlhf"


def get_config(arg: str = ""):
  c = _common()
  return c.make_config(
      setting=SETTING, arg=arg, default_loss="ric", objectives=OBJECTIVES,
      sources=("hh_rlhf/helpful-base:test", "hh_rlhf/harmless-base:test"), eval_sources=(), manual_dir=hh_dir(),
      scorers=("rm",), max_prompt_len=64, max_response_len=96, max_new_tokens=48,
      sft_steps=1, dpo_steps=8, ppo_iterations=2, customize=_customize)


def cpu_stage(section, *, total_steps: int, batch_size: int, lr: float, lora: bool = True) -> None:
  """A CPU-sized stage: float32, no remat, one device, LoRA r=8 (unless `lora=False`), one synchronous
  checkpoint at the end, a log line every step."""
  section.total_steps = total_steps
  section.batch_size = batch_size
  section.optim.update(lr=lr, warmup_steps=min(2, total_steps), decay="constant", weight_decay=0.0)
  section.model.update(dtype="float32", param_dtype="float32", remat="none", scan_layers=True)
  section.trainable = "lora" if lora else "full"
  section.model.lora.update(**(LORA if lora else dict(rank=0)))
  section.mesh.update(data=1, fsdp=-1, tensor=1)
  section.checkpoint.update(every_steps=total_steps, keep=1, async_save=False)
  section.log.update(every_steps=1, tensorboard=False, progress=False, eval_every_steps=0)


def _customize(c, stage, loss):
  del stage
  g = "gguf:" + gguf_path()
  c.tokenizer = gguf_path()  # the file's own tokenizer and ChatML template
  c.data.update(eval_fraction=0.1, max_eval=16, max_train=48, bucket_multiple=32)
  c.sft.pro.update(source="")  # no SFT stage: the instruct model is the reference
  c.rm.pro.update(source=g, objectives=OBJECTIVES)
  cpu_stage(c.rm, total_steps=6, batch_size=4, lr=2e-4)
  c.adapter.pro.update(backbone=g, hidden=64, layers=2)
  cpu_stage(c.adapter, total_steps=12, batch_size=8, lr=3e-3, lora=False)
  c.policy.pro.update(init=g, reference=g)
  if loss == "ric":
    c.policy.pro.update(samples=2, max_prompt_len=c.data.max_prompt_len + 32)  # room for the weight text
  if loss == "ppo":
    c.policy.pro.ppo.update(rollout_batch=4, minibatch=4, ppo_epochs=1, max_new_tokens=32)
  cpu_stage(c.policy, total_steps=6 if loss != "ppo" else 2, batch_size=4, lr=2e-4)
  c.eval.update(grid_step=0.5, max_new_tokens=32, batch_size=8, max_prompts=8, kl=False)
