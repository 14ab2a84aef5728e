"""The engine's own loss functions: language modelling, and a TOY sigmoid DPO for tests and AOT.

They follow the plug-in signature of `build_train_step`: `loss_fn(params, frozen, batch, rng) ->
(loss, metrics)`. The real PRO losses (MODPO, weighted multi-objective DPO, PPO) live in
`pro_jax.pro.losses`; `toy_dpo_loss` here is deliberately minimal: it exists to exercise a
policy + frozen-reference step end to end and to size the 7B step for TPUs.

Token convention (docs/ARCHITECTURE.md): the log-prob of token t comes from the logits at t - 1;
`loss_mask[b, t] = 1` marks tokens to predict.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pro_jax.models import Transformer
from pro_jax.pro.ops import sequence_logprob, token_logprobs


def lm_loss(model: Transformer):
  """Mean next-token NLL over `loss_mask` tokens of a sequence batch (`tokens`, `mask`, `loss_mask`).

  Without `loss_mask`, every real token after the first is predicted. Reports
  `loss_weight` = number of predicted tokens (so micro-batches combine as one token mean) and
  `accuracy` (greedy next-token accuracy).
  """

  def loss_fn(params: Any, frozen: Any, batch: dict, rng: jax.Array):
    del frozen, rng
    tokens_BxL = batch["tokens"]
    mask_BxL = batch.get("mask")
    out = model.apply(params, tokens_BxL, attention_mask_BxL=mask_BxL)
    if "loss_mask" in batch:
      target_BxL = batch["loss_mask"].astype(jnp.float32)
    else:
      real = jnp.ones_like(tokens_BxL, jnp.float32) if mask_BxL is None else mask_BxL.astype(jnp.float32)
      target_BxL = real.at[:, 0].set(0.0)
    logp_BxL = token_logprobs(out.logits, tokens_BxL)
    n = jnp.maximum(target_BxL.sum(), 1.0)
    loss = -(logp_BxL * target_BxL).sum() / n
    pred_BxL = jnp.pad(jnp.argmax(out.logits[:, :-1], axis=-1), ((0, 0), (1, 0)))
    acc = ((pred_BxL == tokens_BxL) * target_BxL).sum() / n
    return loss, {"accuracy": acc, "loss_weight": target_BxL.sum()}

  return loss_fn


def model_sequence_logprob(model: Transformer, variables: Any, tokens_BxL, mask_BxL, loss_mask_BxL) -> jax.Array:
  """Summed log-prob of the `loss_mask` tokens of each row under `model`: [B] float32."""
  out = model.apply(variables, tokens_BxL, attention_mask_BxL=mask_BxL)
  return sequence_logprob(out.logits, tokens_BxL, loss_mask_BxL)


def toy_dpo_loss(model: Transformer, ref_model: Transformer, beta: float = 0.1, concat_pairs: bool = True):
  """TOY sigmoid DPO (Rafailov et al. 2023) on summed response log-probs; the engine's test loss.

  loss = mean_b -log sigmoid(beta * [(pi(y_w) - ref(y_w)) - (pi(y_l) - ref(y_l))]), with the frozen
  reference's variables in `frozen["ref"]`. `concat_pairs=True` runs chosen and rejected through each
  model as one concatenated [2B, L] batch (one forward per model instead of two: 53% vs 48% MFU for
  the 7B step on v5e by the cost model).
  Metrics: `accuracy` (implicit reward of the chosen higher), `margin`, `chosen_logratio`,
  `rejected_logratio`.
  """

  def logps(m, variables, batch):
    if concat_pairs:
      cat = lambda a, b: jnp.concatenate([batch[a], batch[b]], axis=0)
      lp = model_sequence_logprob(m, variables, cat("chosen_tokens", "rejected_tokens"),
                            cat("chosen_mask", "rejected_mask"), cat("chosen_loss_mask", "rejected_loss_mask"))
      return jnp.split(lp, 2)
    return (model_sequence_logprob(m, variables, batch["chosen_tokens"], batch["chosen_mask"], batch["chosen_loss_mask"]),
            model_sequence_logprob(m, variables, batch["rejected_tokens"], batch["rejected_mask"],
                             batch["rejected_loss_mask"]))

  def loss_fn(params: Any, frozen: Any, batch: dict, rng: jax.Array):
    del rng
    policy_chosen_logp_B, policy_rejected_logp_B = logps(model, params, batch)
    ref_chosen_logp_B, ref_rejected_logp_B = jax.lax.stop_gradient(logps(ref_model, frozen["ref"], batch))
    chosen_logratio_B = policy_chosen_logp_B - ref_chosen_logp_B
    rejected_logratio_B = policy_rejected_logp_B - ref_rejected_logp_B
    margin_B = beta * (chosen_logratio_B - rejected_logratio_B)
    loss = -jax.nn.log_sigmoid(margin_B).mean()
    return loss, {"accuracy": (margin_B > 0).mean(), "margin": margin_B.mean(),
                  "chosen_logratio": chosen_logratio_B.mean(), "rejected_logratio": rejected_logratio_B.mean()}

  return loss_fn
