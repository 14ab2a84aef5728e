"""Reddit Summary (the paper's second setting, after RiC): openai/summarize_from_feedback (TL;DR),
objectives summary quality and faithfulness; Llama-2-7B after SFT with LoRA r=64; MORLHF-PPO + PRO by
default, max_new_tokens 48.

    pro-jax aot --config experiments/reddit_summary.py:policy --topology v5e:4x4
    pro-jax aot --config experiments/reddit_summary.py:wdpo   --topology v5e:4x4

Argument: STAGE, LOSS or STAGE,LOSS (experiments/common.py); default stage policy, loss ppo.

* data: summarize_from_feedback/comparisons train (pairs for summary_quality); held-out prompts from
  valid2; raw files under $PRO_JAX_DATA/summarize (docs/data.md).
* scorers (under $PRO_JAX_MODELS): summary quality = Tristan/gpt2_reward_summarization (GPT-2 sequence
  classifier, as in the paper). Faithfulness: the paper does not name its model; we follow RiC, whose
  setup it follows: CogComp/bart-faithful-summary-detector (a BART-base classifier of "summary first,
  then document"): pro_jax imports it and scores with it as RiC does
  (`pro_jax.encoder_reward_scorer(..., preset="faithfulness")`, which the stages' `hf:` scorer entry
  picks for a BART directory).
"""

import pathlib

from pro_jax.configs import load_module_file


def _common():
  return load_module_file(pathlib.Path(__file__).with_name("common.py"), "_pro_jax_experiments_common")


SETTING = "reddit_summary"
OBJECTIVES = ("summary_quality", "faithfulness")
REWARD_MODELS = {"summary_quality": "gpt2_reward_summarization",  # Tristan/...
                 "faithfulness": "bart-faithful-summary-detector"}  # CogComp/... (BART: scored with RiC's faithfulness call)


def get_config(arg: str = ""):
  c = _common()
  data = c.data_dir() + "/summarize"
  return c.make_config(
      setting=SETTING, arg=arg, default_loss="ppo", objectives=OBJECTIVES,
      sources=("summarize_from_feedback/comparisons:train",),
      eval_sources=("summarize_from_feedback/comparisons:valid2",), manual_dir=data,
      scorers=tuple(c.hf_scorer(d, o) for o, d in REWARD_MODELS.items()),
      max_prompt_len=512, max_response_len=64, max_new_tokens=48,
      sft_steps=2000, dpo_steps=1500, ppo_iterations=1000)
