"""PRO losses: reward-model Bradley-Terry, DPO, weighted multi-objective DPO, MODPO, SFT, adapter KL.

Every loss takes arrays and returns `(loss_scalar, metrics)` where `metrics` is a flat dict of
float32 scalars (jittable, no host syncs, static shapes; masks instead of boolean indexing).
Weights that enter a policy loss are constants: each loss applies `jax.lax.stop_gradient` to them.

Optional `mask_B` arguments mark real examples (1) vs. padding rows of a static-shaped batch (0);
padding rows contribute nothing to the loss, its gradient or the metrics.
Sources of each formula are in the docstrings and in docs/method.md.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from pro_jax.pro import ops

Array = jax.Array
Metrics = dict[str, Array]

_sg = jax.lax.stop_gradient


def _example_mask(mask_B: Array | None, like_B: Array) -> Array:
  if mask_B is None:
    return jnp.ones(like_B.shape[:1], jnp.float32)
  return mask_B.astype(jnp.float32)


def _names(objectives: Sequence[str] | None, num: int) -> list[str]:
  if objectives is None:
    return [str(k) for k in range(num)]
  if len(objectives) != num:
    raise ValueError(f"objectives has {len(objectives)} names for {num} columns: {list(objectives)}")
  return list(objectives)


# ----------------------------------------------------------------------------------------------
# Stage 1: multi-head reward model
# ----------------------------------------------------------------------------------------------

def bradley_terry_multi(r_chosen_BxK: Array, r_rejected_BxK: Array, pair_mask_BxK: Array,
                        objectives: Sequence[str] | None = None) -> tuple[Array, Metrics]:
  """Masked per-objective Bradley-Terry loss for a K-head reward model.

  `pair_mask_BxK` holds the pairs' labels per objective (the schema's `pair_objectives`): +1 = the
  chosen response is preferred on objective k, -1 = the rejected one is (the pair is oriented by
  objective k), 0 = no label. With s_bk the label and m_bk = |s_bk|:

    loss = sum_{b,k} m_bk * -log sigmoid(s_bk * (r_k(x_b, y_w) - r_k(x_b, y_l))) / max(sum_{b,k} m_bk, 1)

  i.e. the mean over the (example, objective) labels present in the batch (each label counts
  once, so objectives with more labels weigh more, as if each head were trained on its own pairs
  concatenated). A masked label contributes exactly 0 to the loss and to every gradient.
  Rows with no label at all (padding) simply have m = 0. A 0/1 mask is the all-oriented case.

  Metrics: `loss`, `accuracy` (over all labels: the preferred response of objective k scored
  strictly higher by head k; ties count as wrong), `margin` (mean oriented margin
  s * (r_w - r_l) over labels), `labels` (count), and per objective `accuracy/<name>`,
  `labels/<name>` (accuracy is 0 where an objective has no label in the batch: aggregate
  across batches with the `labels/<name>` counts).
  """
  s_BxK = jnp.sign(pair_mask_BxK.astype(jnp.float32))
  m_BxK = jnp.abs(s_BxK)
  margin_BxK = s_BxK * (r_chosen_BxK.astype(jnp.float32) - r_rejected_BxK.astype(jnp.float32))
  nll_BxK = jax.nn.softplus(-margin_BxK)               # -log sigmoid(margin), stable
  loss = ops.masked_mean(nll_BxK, m_BxK)
  correct_BxK = (margin_BxK > 0).astype(jnp.float32)
  labels_K = jnp.sum(m_BxK, axis=0)
  metrics: Metrics = {
      "loss": loss,
      "accuracy": ops.masked_mean(correct_BxK, m_BxK),
      "margin": ops.masked_mean(margin_BxK, m_BxK),
      "labels": jnp.sum(labels_K),
  }
  acc_K = ops.masked_mean(correct_BxK, m_BxK, axis=0)
  for k, name in enumerate(_names(objectives, m_BxK.shape[-1])):
    metrics[f"accuracy/{name}"] = acc_K[k]
    metrics[f"labels/{name}"] = labels_K[k]
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# Stage 5: offline policy losses
# ----------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo(policy_chosen_logp_B: Array, policy_rejected_logp_B: Array, ref_chosen_logp_B: Array,
        ref_rejected_logp_B: Array, beta: float, label_smoothing: float = 0.0,
        loss_type: str = "sigmoid", mask_B: Array | None = None) -> tuple[Array, Metrics]:
  """DPO loss, exactly TRL's `DPOTrainer.dpo_loss` (TRL v0.7.x-v0.8; e.g. commit 5d1deb1,
  trl/trainer/dpo_trainer.py, the version torchtune's DPOLoss cites):

    logits = (pi_c - pi_r) - (ref_c - ref_r)
    sigmoid: -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls   (cDPO)
    hinge:   relu(1 - beta * logits)                                                   (SLiC)
    ipo:     (logits - 1 / (2 * beta)) ** 2                  (IPO eq. 17; ls is ignored, as in TRL)
    chosen_rewards = beta * (pi_c - ref_c), rejected_rewards = beta * (pi_r - ref_r)  (detached)

  The loss is the mean over (unmasked) examples. TRL feeds IPO length-averaged log-probs
  (`ops.sequence_logprob(..., average=True)`); that choice is the caller's.
  The reference log-probs are constants (stop-gradient).
  Metrics (TRL names): `rewards/chosen`, `rewards/rejected`, `rewards/accuracy`
  (chosen > rejected, strict), `rewards/margin`, `logps/chosen`, `logps/rejected`.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"dpo loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
  pc = policy_chosen_logp_B.astype(jnp.float32)
  pr = policy_rejected_logp_B.astype(jnp.float32)
  rc = _sg(ref_chosen_logp_B.astype(jnp.float32))
  rr = _sg(ref_rejected_logp_B.astype(jnp.float32))
  m_B = _example_mask(mask_B, pc)
  logits_B = (pc - pr) - (rc - rr)
  if loss_type == "sigmoid":
    losses_B = (-jax.nn.log_sigmoid(beta * logits_B) * (1.0 - label_smoothing)
                - jax.nn.log_sigmoid(-beta * logits_B) * label_smoothing)
  elif loss_type == "hinge":
    losses_B = jax.nn.relu(1.0 - beta * logits_B)
  else:  # ipo
    losses_B = (logits_B - 1.0 / (2.0 * beta)) ** 2
  loss = ops.masked_mean(losses_B, m_B)
  chosen_rewards_B = _sg(beta * (pc - rc))
  rejected_rewards_B = _sg(beta * (pr - rr))
  metrics: Metrics = {
      "loss": loss,
      "rewards/chosen": ops.masked_mean(chosen_rewards_B, m_B),
      "rewards/rejected": ops.masked_mean(rejected_rewards_B, m_B),
      "rewards/accuracy": ops.masked_mean((chosen_rewards_B > rejected_rewards_B).astype(jnp.float32), m_B),
      "rewards/margin": ops.masked_mean(chosen_rewards_B - rejected_rewards_B, m_B),
      "logps/chosen": ops.masked_mean(_sg(pc), m_B),
      "logps/rejected": ops.masked_mean(_sg(pr), m_B),
  }
  return loss, metrics


def pair_signs(r_a_BxK: Array, r_b_BxK: Array, mask_BxK: Array | None = None,
               tie_eps: float = 0.0) -> Array:
  """s_k = sign(r_k(a) - r_k(b)) in {-1, 0, +1} [B, K] float32 for `weighted_mo_dpo`.

  |r_k(a) - r_k(b)| <= tie_eps counts as a tie (0); entries with mask 0 (objective not scored
  for this pair) are 0 as well, so they add no term.
  """
  d_BxK = r_a_BxK.astype(jnp.float32) - r_b_BxK.astype(jnp.float32)
  s_BxK = jnp.where(jnp.abs(d_BxK) > tie_eps, jnp.sign(d_BxK), 0.0)
  if mask_BxK is not None:
    s_BxK = jnp.where(mask_BxK != 0, s_BxK, 0.0)
  return _sg(s_BxK)


def weighted_mo_dpo(logratio_a_B: Array, logratio_b_B: Array, signs_BxK: Array, weights_BxK: Array,
                    beta: float, mask_B: Array | None = None) -> tuple[Array, Metrics]:
  """Weighted multi-objective DPO (PRO_METHOD.md, reconstruction):

    loss_b = sum_k w_k(x) * |s_k| * -log sigmoid(s_k * beta * (logratio(a) - logratio(b)))

  with logratio(y) = log pi(y|x) - log pi_ref(y|x) and s_k = sign(r_k(a) - r_k(b)) in {-1, 0, +1}.
  s_k = 0 (a tie on objective k) contributes NO term (not the log 2 of -log sigmoid(0)), and the
  remaining weights are NOT renormalized: a pair tied on every objective contributes 0.
  Weights are constants (stop-gradient). The loss is the mean of loss_b over (unmasked) examples.
  With K = 1, w = 1, s = +1 this is DPO's sigmoid loss.

  Metrics: `loss`, `rewards/margin` (mean beta * (logratio(a) - logratio(b))),
  `weighted_accuracy` (share of the weight on non-tied objectives whose sign the implicit reward
  margin agrees with, strictly), `tie_fraction` (share of (example, objective) entries with s = 0).
  """
  m_B = _example_mask(mask_B, logratio_a_B)
  w_BxK = _sg(weights_BxK.astype(jnp.float32))
  s_BxK = _sg(signs_BxK.astype(jnp.float32))
  margin_B = beta * (logratio_a_B.astype(jnp.float32) - logratio_b_B.astype(jnp.float32))
  active_BxK = jnp.abs(s_BxK)
  z_BxK = s_BxK * margin_B[:, None]
  losses_B = jnp.sum(w_BxK * active_BxK * jax.nn.softplus(-z_BxK), axis=-1)
  loss = ops.masked_mean(losses_B, m_B)
  wa_BxK = w_BxK * active_BxK * m_B[:, None]
  agree_BxK = (z_BxK > 0).astype(jnp.float32)
  metrics: Metrics = {
      "loss": loss,
      "rewards/margin": ops.masked_mean(_sg(margin_B), m_B),
      "weighted_accuracy": ops.masked_mean(_sg(agree_BxK), wa_BxK),
      "tie_fraction": ops.masked_mean((s_BxK == 0).astype(jnp.float32),
                                      jnp.broadcast_to(m_B[:, None], s_BxK.shape)),
  }
  return loss, metrics


def modpo(logratio_w_B: Array, logratio_l_B: Array, weights_BxK: Array, margins_BxK: Array,
          beta: float, w0_min: float = 1e-2, mask_B: Array | None = None,
          label0_B: Array | None = None) -> tuple[Array, Metrics]:
  """MODPO (Zhou et al. 2023, "Beyond One-Preference-Fits-All") with prompt-aware weights:

    z = (1 / w_0) * [beta * (logratio(y_w) - logratio(y_l)) - sum_{k>=1} w_k (r_k(y_w) - r_k(y_l))]
    loss = -log sigmoid(s_0 * z), mean over the pairs labelled for objective 0.

  Objective 0 is learned through the DPO implicit reward, fit on objective 0's OWN preference data
  only (as in MODPO, where the DPO term uses the target objective's preference pairs); objectives
  k >= 1 enter only through the margins of their reward models. `label0_B` is the pairs' label for
  objective 0 (the schema's `pair_objectives[:, 0]`): +1 = y_w is preferred on objective 0, -1 = y_l
  is (the pair is used reversed: swapping y_w and y_l negates the bracket, so the loss is
  -log sigmoid(-z)), 0 = the pair says nothing about objective 0 and is left out (row mask). None
  = every pair is an objective-0 pair with y_w preferred (the plain formula).
  `margins_BxK` may be [B, K] (column 0 is ignored) or [B, K - 1] (objectives 1..K-1).
  w_0 is clamped to >= `w0_min` (default 1e-2, a reconstruction) so 1 / w_0 stays finite when the
  adapter puts (almost) no weight on objective 0; the clamp is reported as `w0_clamped_fraction`.
  Weights and margins are constants (stop-gradient). With K = 1 (no margins) the loss equals DPO
  with beta / w_0.

  Metrics: `loss`, `accuracy` (s_0 z > 0), `rewards/margin` (mean beta * (logratio(y_w) -
  logratio(y_l)), oriented by s_0), `margin_term` (mean sum_{k>=1} w_k margin_k, oriented),
  `w0_clamped_fraction`, `pairs` (how many rows entered the loss).
  """
  m_B = _example_mask(mask_B, logratio_w_B)
  if label0_B is None:
    s_B = jnp.ones_like(m_B)
  else:
    s_B = _sg(jnp.sign(label0_B.astype(jnp.float32)))
  m_B = m_B * jnp.abs(s_B)
  w_BxK = _sg(weights_BxK.astype(jnp.float32))
  num_k = w_BxK.shape[-1]
  margins = _sg(margins_BxK.astype(jnp.float32))
  if margins.shape[-1] == num_k:
    margins = margins[:, 1:]
  elif margins.shape[-1] != num_k - 1:
    raise ValueError(f"modpo margins must have K={num_k} or K-1={num_k - 1} columns, "
                     f"got shape {margins_BxK.shape}")
  w0_B = w_BxK[:, 0]
  w0_safe_B = jnp.maximum(w0_B, w0_min)
  dpo_margin_B = s_B * beta * (logratio_w_B.astype(jnp.float32) - logratio_l_B.astype(jnp.float32))
  margin_term_B = s_B * jnp.sum(w_BxK[:, 1:] * margins, axis=-1)
  z_B = (dpo_margin_B - margin_term_B) / w0_safe_B
  loss = ops.masked_mean(jax.nn.softplus(-z_B), m_B)
  metrics: Metrics = {
      "loss": loss,
      "accuracy": ops.masked_mean((_sg(z_B) > 0).astype(jnp.float32), m_B),
      "rewards/margin": ops.masked_mean(_sg(dpo_margin_B), m_B),
      "margin_term": ops.masked_mean(margin_term_B, m_B),
      "w0_clamped_fraction": ops.masked_mean((w0_B < w0_min).astype(jnp.float32), m_B),
      "pairs": jnp.sum(m_B),
  }
  return loss, metrics


def sft(logits_BxLxV: Array, tokens_BxL: Array, loss_mask_BxL: Array,
        per_sequence: bool = False) -> tuple[Array, Metrics]:
  """Next-token NLL on response tokens.

  Default: token mean, sum_{b,t} m_bt * nll_bt / sum_{b,t} m_bt (long responses weigh more).
  `per_sequence=True`: mean over sequences (with at least one response token) of each
  sequence's token-mean NLL. Metrics: `loss`, `nll_per_token` (token mean either way),
  `tokens` (count).
  """
  logp_BxL = ops.token_logprobs(logits_BxLxV, tokens_BxL)
  m_BxL = loss_mask_BxL.astype(jnp.float32)
  token_mean = -ops.masked_mean(logp_BxL, m_BxL)
  if per_sequence:
    seq_nll_B = -ops.masked_mean(logp_BxL, m_BxL, axis=-1)
    has_B = (jnp.sum(m_BxL, axis=-1) > 0).astype(jnp.float32)
    loss = ops.masked_mean(seq_nll_B, has_B)
  else:
    loss = token_mean
  return loss, {"loss": loss, "nll_per_token": _sg(token_mean), "tokens": jnp.sum(m_BxL)}


# ----------------------------------------------------------------------------------------------
# Stage 4: the preference adapter
# ----------------------------------------------------------------------------------------------

def average_ranks(x_BxK: Array) -> Array:
  """Ranks 1..K along the last axis, ties get their average rank (O(K^2), for small K)."""
  x_i = x_BxK[..., :, None]
  x_j = x_BxK[..., None, :]
  less = jnp.sum((x_j < x_i).astype(jnp.float32), axis=-1)
  equal = jnp.sum((x_j == x_i).astype(jnp.float32), axis=-1)   # includes itself
  return less + 0.5 * (equal - 1.0) + 1.0


def spearman_rows(x_BxK: Array, y_BxK: Array) -> tuple[Array, Array]:
  """Spearman correlation per row (average ranks for ties) -> (rho_B, defined_B).

  A row where x or y is constant (all tied) has no defined correlation: rho = 0, defined = 0.
  """
  rx = average_ranks(x_BxK)
  ry = average_ranks(y_BxK)
  rx = rx - jnp.mean(rx, axis=-1, keepdims=True)
  ry = ry - jnp.mean(ry, axis=-1, keepdims=True)
  sxx = jnp.sum(rx * rx, axis=-1)
  syy = jnp.sum(ry * ry, axis=-1)
  defined = (sxx > 0) & (syy > 0)
  denom = jnp.sqrt(jnp.where(defined, sxx * syy, 1.0))
  rho = jnp.where(defined, jnp.sum(rx * ry, axis=-1) / denom, 0.0)
  return rho, defined.astype(jnp.float32)


def adapter_kl(target_weights_BxK: Array, adapter_logits_BxK: Array,
               mask_B: Array | None = None) -> tuple[Array, Metrics]:
  """L_PRO = mean_x KL(w*(x) || f(x)) with f = softmax(adapter_logits) (PRO_METHOD.md stage 4):

    KL = sum_k w*_k (log w*_k - log f_k),   0 log 0 = 0.

  The targets are constants (stop-gradient); the gradient w.r.t. the logits is f - w* (for a
  target on the simplex). Metrics: `loss` (= `kl`), `top1_agreement` (argmax f == argmax w*;
  ties resolved to the first index), `spearman` (rank correlation per example with average ranks
  for ties, averaged over examples where it is defined), `spearman_defined` (that count),
  `entropy` (mean entropy of f).
  """
  w_BxK = _sg(target_weights_BxK.astype(jnp.float32))
  logf_BxK = jax.nn.log_softmax(adapter_logits_BxK.astype(jnp.float32), axis=-1)
  m_B = _example_mask(mask_B, w_BxK)
  kl_B = jnp.sum(jax.scipy.special.xlogy(w_BxK, w_BxK) - w_BxK * logf_BxK, axis=-1)
  loss = ops.masked_mean(kl_B, m_B)
  f_BxK = jnp.exp(_sg(logf_BxK))
  top1_B = (jnp.argmax(f_BxK, axis=-1) == jnp.argmax(w_BxK, axis=-1)).astype(jnp.float32)
  rho_B, defined_B = spearman_rows(f_BxK, w_BxK)
  metrics: Metrics = {
      "loss": loss,
      "kl": _sg(loss),
      "top1_agreement": ops.masked_mean(top1_B, m_B),
      "spearman": ops.masked_mean(rho_B, defined_B * m_B),
      "spearman_defined": jnp.sum(defined_B * m_B),
      "entropy": ops.masked_mean(-jnp.sum(f_BxK * _sg(logf_BxK), axis=-1), m_B),
  }
  return loss, metrics
