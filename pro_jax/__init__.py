"""pro-jax: prompt-aware multi-objective alignment (PRO) in JAX.

The public API is re-exported here and imported lazily, so ``import pro_jax`` is cheap.
"""

from __future__ import annotations

import logging as _logging

from pro_jax._lazy import lazy_api

__version__ = "0.1.0"  # = pyproject.toml's version (tests/test_cli.py checks it)


class _NoTorchNotice(_logging.Filter):
  """transformers announces "PyTorch was not found..." when imported without torch; pro-jax never needs
  torch (its models are Flax), so the notice only misleads. Only that one record is dropped."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


_logging.getLogger("transformers").addFilter(_NoTorchNotice())

# name -> module that defines it
_API = {
    "ModelConfig": "pro_jax.models.config",
    "LoRAConfig": "pro_jax.models.config",
    "RopeScaling": "pro_jax.models.config",
    "Transformer": "pro_jax.models.transformer",
    "ModelOutput": "pro_jax.models.transformer",
    "init_variables": "pro_jax.models.transformer",
    "init_cache": "pro_jax.models.transformer",
    "logical_axes": "pro_jax.models.transformer",
    "make_mesh": "pro_jax.sharding",
    # training engine
    "load_checkpoint": "pro_jax.train.checkpoint",
    "LoadedCheckpoint": "pro_jax.train.checkpoint",
    "Task": "pro_jax.train.trainer",
    # models: import / export
    "load_hf_model": "pro_jax.models.hf_io",
    "save_hf_model": "pro_jax.models.hf_io",
    "CheckpointError": "pro_jax.models.hf_config",
    "load_llama2c": "pro_jax.models.llama2c",
    "load_gguf": "pro_jax.models.gguf",
    "load_tokenizer": "pro_jax.models.tokenizer",
    "generate": "pro_jax.models.generate",
    "GenerateOutput": "pro_jax.models.generate",
    "sample_logits": "pro_jax.models.generate",
    "load_encoder_classifier": "pro_jax.models.encoders",
    "EncoderClassifier": "pro_jax.models.encoders",
    "encoder_reward_scorer": "pro_jax.models.encoder_scorer",
    "merge_lora": "pro_jax.models.lora",
    "init_lora": "pro_jax.models.lora",
    "lora_only": "pro_jax.models.lora",
    "lora_param_count": "pro_jax.models.lora",
    # data
    "load_examples": "pro_jax.data.sources",
    "build_dataset": "pro_jax.data.sources",
    "data_source": "pro_jax.data.sources",
    "GenericConfig": "pro_jax.data.builders.generic",
    "validate_example": "pro_jax.data.validate",
    "ValidationReport": "pro_jax.data.validate",
    "DataError": "pro_jax.data.errors",
    "SyntheticTaskConfig": "pro_jax.data.synthetic",
    "generate_task": "pro_jax.data.synthetic",
    "SyntheticRewards": "pro_jax.data.synthetic",
    "Pipeline": "pro_jax.data.pipeline",
    "PipelineConfig": "pro_jax.data.pipeline",
    # PRO math
    "NormStats": "pro_jax.pro.normalize",
    "fit_norm_stats": "pro_jax.pro.normalize",
    "parse_weights_source": "pro_jax.pro.weights",
    "simplex_grid": "pro_jax.pro.weights",
    # PRO stages
    "train_reward_model": "pro_jax.stages.rm",
    "load_reward_model": "pro_jax.stages.rm",
    "hf_reward_scorer": "pro_jax.stages.scoring",
    "RewardModelScorer": "pro_jax.stages.scoring",
    "StackedScorer": "pro_jax.stages.scoring",
    "CachedScorer": "pro_jax.stages.scoring",
    "train_adapter": "pro_jax.stages.adapter",
    "load_adapter": "pro_jax.stages.adapter",
    "load_pro": "pro_jax.stages.use",
    "ProRun": "pro_jax.stages.use",
    "export_run": "pro_jax.stages.export",
    "save_peft_adapter": "pro_jax.models.peft_io",
    "load_peft_adapter": "pro_jax.models.peft_io",
    "push_to_hub": "pro_jax.models.hub",
    "PreferenceAdapter": "pro_jax.stages.adapter",
    "policy_loss": "pro_jax.stages.policy",
    "run_ppo": "pro_jax.stages.ppo",
    "PPOConfig": "pro_jax.stages.ppo",
    "run_pipeline": "pro_jax.stages.pipeline",
    "run_stage": "pro_jax.stages.pipeline",
    "run_demo": "pro_jax.stages.demo",
    "load_config": "pro_jax.configs",
}


__getattr__, __dir__ = lazy_api(__name__, globals(), _API)

__all__ = sorted(_API)
