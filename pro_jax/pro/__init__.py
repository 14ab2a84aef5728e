"""The PRO method (Preference Orchestrator): pure math used by the PRO stages.

- `ops`: token log-probs, masked reductions, entropy, mean pooling.
- `losses`: reward-model Bradley-Terry, DPO (TRL formulas), weighted multi-objective DPO, MODPO,
  SFT, adapter KL.
- `ppo`: KL-penalized rewards, GAE, whitening, clipped policy / value losses, KL controllers.
- `normalize`: per-objective reward normalization statistics (z-score, min-max, quantile).
- `weights`: adapter targets, `weights_source`, simplex grids, weight-conditioned prompt text.
- `metrics`: numpy evaluation metrics (utility, Pareto front, hypervolume, win rate, ...).

See docs/method.md for the formulas and which parts are reconstructions of the paper.
"""

from pro_jax.pro import losses, metrics, normalize, ops, ppo, weights  # noqa: F401
from pro_jax.pro.losses import (adapter_kl, bradley_terry_multi, dpo, modpo, sft,  # noqa: F401
                                weighted_mo_dpo)
from pro_jax.pro.normalize import NormStats, fit_norm_stats  # noqa: F401
from pro_jax.pro.ppo import (AdaptiveKLController, FixedKLController, KLState, gae,  # noqa: F401
                             kl_penalized_rewards, ppo_policy_loss, ppo_value_loss, whiten)
from pro_jax.pro.weights import (WeightsSource, parse_weights_source, resolve_weights,  # noqa: F401
                                 simplex_grid, target_weights)
