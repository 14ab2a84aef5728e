"""Helpful Assistant (the paper's first setting, after RiC): Anthropic HH-RLHF, objectives harmless,
helpful, humor; Llama-2-7B after SFT with LoRA r=64; MORLHF-PPO + PRO by default.

    pro-jax aot    --config experiments/helpful_assistant.py:policy --topology v5e:4x4   # the PPO update step
    pro-jax aot    --config experiments/helpful_assistant.py:modpo  --topology v5e:4x4   # MODPO + PRO
    experiments/launch_helpful_assistant.sh --name N --zone Z --workdir gs://B/hh --dry-run

Argument: STAGE, LOSS or STAGE,LOSS, then options (experiments/common.py); default stage policy, loss ppo;
option `no_humor` (K = 2).

* data: hh_rlhf helpful-base + harmless-base train splits (their test splits are the held-out prompts),
  raw files under $PRO_JAX_DATA/hh-rlhf (docs/data.md); over-long rows dropped (mode lenient).
  HH pairs speak for helpful (helpful-base) or harmless (harmless-base); humor has no pairs.
* scorers: the paper's reward models under $PRO_JAX_MODELS: Ray2333/gpt2-large-harmless-reward_model,
  Ray2333/gpt2-large-helpful-reward_model (GPT-2 sequence classifiers: supported) and
  mohameddhiab/humor-no-humor, a DistilBERT classifier: pro_jax imports it and scores with it as RiC
  does (`pro_jax.encoder_reward_scorer(..., preset="humor")`, which the stages' `hf:` scorer entry
  picks for a DistilBERT directory); drop humor with the option `no_humor` (e.g.
  `experiments/helpful_assistant.py:sft,ppo,no_humor`; launch script `--option no_humor`).
* PPO (the paper): lr 1e-5, batch 64, initial KL 0.2, adaptive target 3, grad norm 0.5, temperature
  0.7, max_new_tokens 128. RiC-style offline (`:ric`): lr 1.414e-4, 20k steps.
"""

import pathlib

from pro_jax.configs import load_module_file


def _common():
  return load_module_file(pathlib.Path(__file__).with_name("common.py"), "_pro_jax_experiments_common")


SETTING = "helpful_assistant"
OBJECTIVES = ("harmless", "helpful", "humor")
REWARD_MODELS = {"harmless": "gpt2-large-harmless-reward_model",  # Ray2333/...
                 "helpful": "gpt2-large-helpful-reward_model",  # Ray2333/...
                 "humor": "humor-no-humor"}  # mohameddhiab/... (DistilBERT: scored with RiC's humor call)


def get_config(arg: str = ""):
  c = _common()
  data = c.data_dir() + "/hh-rlhf"
  return c.make_config(
      setting=SETTING, arg=arg, default_loss="ppo", objectives=OBJECTIVES,
      sources=("hh_rlhf/helpful-base:train", "hh_rlhf/harmless-base:train"),
      eval_sources=("hh_rlhf/helpful-base:test", "hh_rlhf/harmless-base:test"), manual_dir=data,
      scorers=tuple(c.hf_scorer(d, o) for o, d in REWARD_MODELS.items()),
      max_prompt_len=256, max_response_len=256, max_new_tokens=128,
      sft_steps=2000, dpo_steps=1500, ppo_iterations=1000, options={"no_humor": _no_humor})


def _no_humor(c):
  """Option `no_humor`: objectives harmless and helpful only (the two GPT-2 reward models pro_jax imports)."""
  c.objectives = OBJECTIVES[:2]
  c.scorers = tuple(s for s in c.scorers if not s.endswith("=humor"))
