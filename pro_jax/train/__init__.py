"""The training engine: one sharded train step, Orbax checkpoints with exact resume, AOT TPU compile.

Map (see docs/training.md):
  step.py        build_train_step: THE jitted step (value_and_grad, micro-batch scan, guards, Optax)
  state.py       TrainState, trainable / non-trainable split of the variables, state shardings
  optimizer.py   AdamW + warmup + cosine / linear decay + global-norm clipping
  losses.py      lm_loss, the toy sigmoid DPO (the engine's test losses)
  trainer.py     Task, setup, train: the loop (restore, data, logging, checkpoints, SIGTERM)
  checkpoint.py  Checkpointer (Orbax CheckpointManager), load_checkpoint
  config.py      validate_config, model_config_from
  tasks.py       build_task: the generic `pro-jax train` tasks
  data.py        tiny deterministic data sources with get_state / set_state
  aot.py         aot_compile for a TPU topology
  commands.py    the `train` and `aot` subcommands; argument helpers for stage commands
  logging.py     metrics logger, progress bar, MFU (separate module)

Names are imported lazily: `from pro_jax.train import build_train_step` works without importing
everything else.
"""

from __future__ import annotations

from pro_jax._lazy import lazy_api

_API = {
    "build_train_step": "pro_jax.train.step",
    "TrainStep": "pro_jax.train.step",
    "TrainState": "pro_jax.train.state",
    "init_state": "pro_jax.train.state",
    "split_variables": "pro_jax.train.state",
    "merge_variables": "pro_jax.train.state",
    "state_shardings": "pro_jax.train.state",
    "make_optimizer": "pro_jax.train.optimizer",
    "Task": "pro_jax.train.trainer",
    "setup": "pro_jax.train.trainer",
    "train": "pro_jax.train.trainer",
    "jit_init": "pro_jax.train.trainer",
    "Checkpointer": "pro_jax.train.checkpoint",
    "load_checkpoint": "pro_jax.train.checkpoint",
    "LoadedCheckpoint": "pro_jax.train.checkpoint",
    "validate_config": "pro_jax.train.config",
    "model_config_from": "pro_jax.train.config",
    "aot_compile": "pro_jax.train.aot",
}


__getattr__, __dir__ = lazy_api(__name__, globals(), _API)

__all__ = sorted(_API)
