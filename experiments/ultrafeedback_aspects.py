"""UltraFeedback aspects (the paper's third setting): the raw openbmb/UltraFeedback release with its four
per-aspect ratings, objectives instruction_following, honesty, truthfulness, helpfulness; Llama-2-7B
after SFT with LoRA r=64; weighted multi-objective DPO + PRO by default.

    pro-jax aot --config experiments/ultrafeedback_aspects.py:policy --topology v5e:4x4   # wdpo
    pro-jax aot --config experiments/ultrafeedback_aspects.py:ppo    --topology v5e:4x4
    pro-jax aot --config experiments/ultrafeedback_aspects.py:rm     --topology v5e:4x4

Argument: STAGE, LOSS or STAGE,LOSS (experiments/common.py); default stage policy, loss wdpo.

* data: ultrafeedback/raw (every completion with its four ratings; a best-vs-worst pair whose
  pair_objectives mark the aspects that agree), raw files under $PRO_JAX_DATA/ultrafeedback/raw
  (docs/data.md); 2% of the rows held out.
* scorers: no public per-aspect reward models are named by the paper, so stage rm trains ONE reward
  model with four heads (Bradley-Terry per aspect on the pairs, masked by pair_objectives) on the SFT
  model (LoRA), and the pipeline scores with it ("rm").
"""

import pathlib

from pro_jax.configs import load_module_file


def _common():
  return load_module_file(pathlib.Path(__file__).with_name("common.py"), "_pro_jax_experiments_common")


SETTING = "ultrafeedback_aspects"
OBJECTIVES = ("instruction_following", "honesty", "truthfulness", "helpfulness")


def get_config(arg: str = ""):
  c = _common()
  return c.make_config(
      setting=SETTING, arg=arg, default_loss="wdpo", objectives=OBJECTIVES,
      sources=("ultrafeedback/raw:train",), eval_sources=(), manual_dir=c.data_dir() + "/ultrafeedback",
      scorers=("rm",), max_prompt_len=512, max_response_len=512, max_new_tokens=256,
      sft_steps=2000, dpo_steps=1000, ppo_iterations=500,
      customize=_customize)


def _customize(c, stage, loss):
  c.data.eval_fraction = 0.02
  if loss in ("modpo", "wdpo", "dpo"):
    c.policy.batch_size = 32  # 1024-token pairs: see docs/experiments.md for the HBM figures
