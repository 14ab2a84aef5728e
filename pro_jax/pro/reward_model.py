"""Stage 1: multi-objective reward models.

A multi-head reward model is a `Transformer` with ``head="score"`` and ``num_labels = K``: a shared
backbone and K linear heads read at the last real token. It is trained with the Bradley-Terry loss
per objective, masked where a pair does not speak for an objective:
``sum_k m_k * -log sigmoid(r_k(x, y_w) - r_k(x, y_l))`` (mean over present labels). Chosen and
rejected sequences go through the backbone as one concatenated [2B, L] batch.

`pair_accuracy` is the RM's metric: per-objective accuracy on held-out pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.data.pipeline import Pipeline
from pro_jax.models import Transformer
from pro_jax.pro.losses import bradley_terry_multi
from pro_jax.pro.stage import batched_apply


def _pair_scores(model: Transformer, variables: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
  scores_2BxK = model.apply(variables, tokens, mask).scores
  return jnp.split(scores_2BxK, 2)


def rm_loss(model: Transformer, objectives: Sequence[str]):
  """Plug-in loss: Bradley-Terry per objective on a pair batch (``pair_objectives`` is the mask)."""

  def loss_fn(params: Any, frozen: Any, batch: dict, rng: jax.Array):
    del frozen, rng
    r_chosen_BxK, r_rejected_BxK = _pair_scores(model, params, batch)
    real_B = (batch["example_id"] >= 0).astype(jnp.float32)
    mask_BxK = batch["pair_objectives"] * real_B[:, None]
    loss, metrics = bradley_terry_multi(r_chosen_BxK, r_rejected_BxK, mask_BxK, objectives)
    metrics = dict(metrics)
    metrics["loss_weight"] = mask_BxK.sum()
    return loss, metrics

  return loss_fn


def pair_accuracy(model: Transformer, variables: Any, pipeline: Pipeline,
                  objectives: Sequence[str]) -> dict[str, Any]:
  """Per-objective held-out accuracy (chosen scored strictly higher) over one pass of `pipeline`.

  Returns {"accuracy": {objective: acc}, "count": {objective: n_pairs}, "mean_accuracy": float}.
  """
  fn = jax.jit(lambda b: _pair_scores(model, variables, b))
  correct = np.zeros(len(objectives))
  count = np.zeros(len(objectives))
  for batch in pipeline.iterator():
    rc, rr = jax.device_get(fn(batch))
    m = batch["pair_objectives"] * (batch["example_id"] >= 0)[:, None]
    correct += ((rc > rr) * m).sum(0)
    count += m.sum(0)
  acc = {o: (float(c / n) if n else float("nan")) for o, c, n in zip(objectives, correct, count)}
  present = [a for a, n in zip(acc.values(), count) if n]
  return {"accuracy": acc, "count": {o: int(n) for o, n in zip(objectives, count)},
          "mean_accuracy": float(np.mean(present)) if present else float("nan")}


def score_sequences(model: Transformer, variables: Any, tokens: np.ndarray, mask: np.ndarray,
                    batch_size: int = 64) -> np.ndarray:
  """Scores [N, K] of right-padded sequences, in fixed-size jitted batches."""
  fn = jax.jit(lambda tokens, mask: model.apply(variables, tokens, mask).scores)
  return batched_apply(fn, {"tokens": tokens, "mask": mask}, batch_size)
