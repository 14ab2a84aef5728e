"""The training engine: one sharded train step, Orbax checkpoints with exact resume, AOT TPU compile.

Map (see docs/training.md):
  step.py        build_train_step: THE jitted step (value_and_grad, micro-batch scan, guards, Optax)
  state.py       TrainState, trainable / non-trainable split of the variables, state shardings
  optimizer.py   AdamW + warmup + cosine / linear decay + global-norm clipping
  losses.py      lm_loss, the toy sigmoid DPO (the engine's test losses)
  trainer.py     Task, setup, train: one batch per step on the run loop
  loop.py        RunLoop: workdir guard, restore / init, logger, progress, SIGTERM, non-finite guard,
                 checkpoints (shared by `train` and the PPO stage); Preempted, NonFiniteError, WorkdirError
  checkpoint.py  Checkpointer (Orbax CheckpointManager), load_checkpoint
  config.py      validate_config, model_config_from
  tasks.py       build_task: the generic `pro-jax train` tasks
  data.py        tiny deterministic data sources with get_state / set_state
  aot.py         aot_compile for a TPU topology
  commands.py    `Command` and exit codes, the `train` subcommand, argument helpers for every command
  logging.py     metrics logger, progress bar
  flops.py       model FLOPs per step, peak FLOP/s per device, MFU

Import the modules (`from pro_jax.train.step import build_train_step`); the package's public names
are in `pro_jax`.
"""
