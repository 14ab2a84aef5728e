"""The PRO stage runners: each stage builds an engine `Task` (`tasks.py`, the one task builder, also
used by `pro-jax aot`) from its config, data and weights and trains it with the engine's loop.

- `tasks`: stage model configs, batch specs, engine configs and Tasks (real or abstract weights).
- `sft` / `rm` / `adapter` / `policy` / `ppo`: the stages' losses and runners.
- `scoring`: scorers (reward models, imported HF classifiers, stacks, the SQLite cache).
- `evaluate`: PRO against fixed weights; `context`: a run's data, tokenizer, scorers, normalization.
- `pipeline`: the five stages over one config and workdir; `demo`: `make demo`.
- `commands`: the stages' `pro-jax` subcommands (and `aot`).
"""
