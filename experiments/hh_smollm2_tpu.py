"""The real-model HH-RLHF experiment (experiments/hh_smollm2.py) at TPU size: Llama-2-7B with LoRA r=64
on the full HH-RLHF helpful-base + harmless-base train splits (test splits held out), objectives
helpful and harmless, a TRAINED 2-head reward model (masked Bradley-Terry: helpful-base pairs speak for
helpful, harmless-base for harmless), the preference adapter on the frozen SFT model's prompt features,
and by default the same weight-conditioned policy as the CPU run (RiC-style, best_of conditioning).

    pro-jax aot --config experiments/hh_smollm2_tpu.py:rm     --topology v5e:4x4   # the reward model step
    pro-jax aot --config experiments/hh_smollm2_tpu.py:policy --topology v5e:4x4   # RiC-style policy (default)
    pro-jax aot --config experiments/hh_smollm2_tpu.py:wdpo   --topology v5e:4x4   # weighted multi-objective DPO

Argument: STAGE, LOSS or STAGE,LOSS (experiments/common.py); default stage policy, loss ric.
The CPU run trains 2 linear heads on frozen SmolLM2 features and samples best-of-n candidates once
because of 2 CPU cores (docs/results.md); on a TPU slice every stage trains the model as the library's
stage runners do (`pro-jax rm / adapter / policy / eval`). The evaluation reward model of the CPU run
(an independent RM on the other half of the pairs) is a second run of the `rm` stage with another
seed and data slice (`--config.seed`, `--config.data.sources`).
"""

import pathlib

from pro_jax.configs import load_module_file


def _common():
  return load_module_file(pathlib.Path(__file__).with_name("common.py"), "_pro_jax_experiments_common")


SETTING = "hh_smollm2_tpu"
OBJECTIVES = ("helpful", "harmless")


def get_config(arg: str = ""):
  c = _common()
  return c.make_config(
      setting=SETTING, arg=arg, default_loss="ric", objectives=OBJECTIVES,
      sources=("hh_rlhf/helpful-base:train", "hh_rlhf/harmless-base:train"),
      eval_sources=("hh_rlhf/helpful-base:test", "hh_rlhf/harmless-base:test"), manual_dir=c.data_dir() + "/hh-rlhf",
      scorers=("rm",), max_prompt_len=256, max_response_len=256, max_new_tokens=128,
      sft_steps=2000, dpo_steps=1500, ppo_iterations=1000, customize=_customize)


def _customize(c, stage, loss):
  del stage, loss
  c.rm.pro.objectives = OBJECTIVES  # the 2-head reward model's heads, in the objectives' order
  c.eval.grid_step = 0.1  # K = 2: the same 11-vector grid as the CPU run
