"""PRO losses against hand-computed values and TRL's DPO formulas written plainly in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.pro import losses


def softplus(x):
  return math.log1p(math.exp(x))


def log_sigmoid(x):
  return -softplus(-x)


# ------------------------------------------------------------------ Bradley-Terry (reward model)

def test_bradley_terry_hand_values_and_metrics():
  r_c = np.array([[2.0, 100.0], [1.0, 3.0]], np.float32)
  r_r = np.array([[1.0, -50.0], [2.0, 3.0]], np.float32)
  m = np.array([[1, 0], [1, 1]], np.float32)
  loss, met = losses.bradley_terry_multi(jnp.asarray(r_c), jnp.asarray(r_r), jnp.asarray(m),
                                         objectives=("helpful", "harmless"))
  # labels: margin 1 (correct), margin -1 (wrong), margin 0 (tie = wrong)
  want = (softplus(-1.0) + softplus(1.0) + math.log(2.0)) / 3
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  np.testing.assert_allclose(float(met["accuracy"]), 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(met["accuracy/helpful"]), 0.5)
  np.testing.assert_allclose(float(met["accuracy/harmless"]), 0.0)
  assert float(met["labels/helpful"]) == 2 and float(met["labels/harmless"]) == 1
  np.testing.assert_allclose(float(met["margin"]), 0.0, atol=1e-7)


def test_bradley_terry_masked_entries_contribute_exactly_zero():
  m = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  r_r = jnp.array([[1.0, -50.0], [2.0, 3.0]])

  def f(r_c):
    return losses.bradley_terry_multi(r_c, r_r, m)[0]

  base = jnp.array([[2.0, 100.0], [1.0, 3.0]])
  other = base.at[0, 1].set(-1e6)                       # masked entry changed wildly
  assert float(f(base)) == float(f(other))
  g = np.asarray(jax.grad(f)(base))
  assert g[0, 1] == 0.0
  # d/dr_c softplus(-(r_c - r_r)) / 3 = -sigmoid(-(margin)) / 3
  np.testing.assert_allclose(g[0, 0], -1 / (1 + math.exp(1.0)) / 3, rtol=1e-6)
  np.testing.assert_allclose(g[1, 1], -0.5 / 3, rtol=1e-6)


def test_bradley_terry_label_minus_one_orients_the_pair_by_that_objective():
  """A -1 label (the rejected response is preferred on objective k) is the pair swapped for k."""
  r_c = jnp.array([[2.0, 0.5], [1.0, 3.0]])
  r_r = jnp.array([[1.0, 1.5], [2.0, 1.0]])
  signed = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
  loss, met = losses.bradley_terry_multi(r_c, r_r, signed, objectives=("a", "b"))
  # oriented margins: +1, +1 (1.5 - 0.5), +1 (2 - 1), +2
  want = (3 * softplus(-1.0) + softplus(-2.0)) / 4
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(met["accuracy"]) == 1.0 and float(met["labels"]) == 4.0
  np.testing.assert_allclose(float(met["margin"]), 5 / 4, rtol=1e-6)
  # the same as feeding the swapped pair with a +1 label, column by column
  swap = signed < 0
  loss2, _ = losses.bradley_terry_multi(jnp.where(swap, r_r, r_c), jnp.where(swap, r_c, r_r), jnp.abs(signed))
  np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-6)


def test_bradley_terry_empty_mask_is_zero_not_nan():
  loss, met = losses.bradley_terry_multi(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)))
  assert float(loss) == 0.0 and float(met["accuracy"]) == 0.0


# ------------------------------------------------------------------ DPO (TRL)

def trl_dpo_numpy(pc, pr, rc, rr, beta, label_smoothing, loss_type):
  """TRL DPOTrainer.dpo_loss (v0.7/v0.8), written out plainly."""
  out, cr, rj = [], [], []
  for a, b, c, d in zip(pc, pr, rc, rr):
    logits = (a - b) - (c - d)
    if loss_type == "sigmoid":
      l = (-log_sigmoid(beta * logits) * (1 - label_smoothing)
           - log_sigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
      l = max(0.0, 1 - beta * logits)
    else:
      l = (logits - 1 / (2 * beta)) ** 2
    out.append(l)
    cr.append(beta * (a - c))
    rj.append(beta * (b - d))
  return np.mean(out), np.array(cr), np.array(rj)


PC = [-10.0, -20.5, -7.25, -3.0]
PR = [-12.0, -19.0, -9.0, -3.5]
RC = [-11.0, -20.0, -8.0, -2.0]
RR = [-11.0, -20.0, -8.5, -4.0]


@pytest.mark.parametrize("loss_type,ls,beta", [("sigmoid", 0.0, 0.1), ("sigmoid", 0.1, 0.5),
                                               ("ipo", 0.0, 0.1), ("hinge", 0.0, 0.5)])
def test_dpo_matches_trl_formula(loss_type, ls, beta):
  args = [jnp.asarray(v, jnp.float32) for v in (PC, PR, RC, RR)]
  loss, met = jax.jit(losses.dpo, static_argnames=("loss_type",))(
      *args, beta=beta, label_smoothing=ls, loss_type=loss_type)
  want, cr, rj = trl_dpo_numpy(PC, PR, RC, RR, beta, ls, loss_type)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(met["rewards/chosen"]), cr.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(met["rewards/rejected"]), rj.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(met["rewards/accuracy"]), np.mean(cr > rj))
  np.testing.assert_allclose(float(met["rewards/margin"]), np.mean(cr - rj), rtol=1e-5)


def test_dpo_single_hand_value_and_reference_is_constant():
  # logits = (-10 + 12) - (-11 + 11) = 2; beta 0.1 -> -log sigmoid(0.2) = log(1 + e^-0.2)
  f = lambda pc, rc: losses.dpo(pc, jnp.array([-12.0]), rc, jnp.array([-11.0]), beta=0.1)[0]
  np.testing.assert_allclose(float(f(jnp.array([-10.0]), jnp.array([-11.0]))),
                             math.log1p(math.exp(-0.2)), rtol=1e-6)
  g_pc, g_rc = jax.grad(f, argnums=(0, 1))(jnp.array([-10.0]), jnp.array([-11.0]))
  np.testing.assert_allclose(np.asarray(g_pc), [-0.1 / (1 + math.exp(0.2))], rtol=1e-6)
  assert float(g_rc[0]) == 0.0


def test_dpo_example_mask_and_bad_type():
  args = [jnp.asarray(v, jnp.float32) for v in (PC, PR, RC, RR)]
  loss, _ = losses.dpo(*args, beta=0.1, mask_B=jnp.array([1.0, 1.0, 0.0, 0.0]))
  want, _, _ = trl_dpo_numpy(PC[:2], PR[:2], RC[:2], RR[:2], 0.1, 0.0, "sigmoid")
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  with pytest.raises(ValueError, match="loss_type"):
    losses.dpo(*args, beta=0.1, loss_type="kto")


# ------------------------------------------------------------------ weighted multi-objective DPO

def test_weighted_mo_dpo_reduces_to_dpo():
  lr_a = jnp.array([1.0, -0.5, 2.0])
  lr_b = jnp.array([-1.0, 0.5, 2.5])
  loss, _ = losses.weighted_mo_dpo(lr_a, lr_b, jnp.ones((3, 1)), jnp.ones((3, 1)), beta=0.3)
  # DPO with policy logps = logratios and reference 0
  want, _, _ = trl_dpo_numpy(list(np.asarray(lr_a)), list(np.asarray(lr_b)), [0.0] * 3, [0.0] * 3,
                             0.3, 0.0, "sigmoid")
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_weighted_mo_dpo_hand_value_ties_and_constant_weights():
  lr_a, lr_b = jnp.array([1.5]), jnp.array([-0.5])        # beta 0.1 -> margin 0.2
  signs = jnp.array([[1.0, -1.0, 0.0]])
  w = jnp.array([[0.5, 0.3, 0.2]])
  loss, met = losses.weighted_mo_dpo(lr_a, lr_b, signs, w, beta=0.1)
  want = 0.5 * softplus(-0.2) + 0.3 * softplus(0.2)       # the tie adds nothing
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  np.testing.assert_allclose(float(met["weighted_accuracy"]), 0.5 / 0.8, rtol=1e-6)
  np.testing.assert_allclose(float(met["tie_fraction"]), 1 / 3, rtol=1e-6)
  gw = jax.grad(lambda ww: losses.weighted_mo_dpo(lr_a, lr_b, signs, ww, beta=0.1)[0])(w)
  assert np.all(np.asarray(gw) == 0.0)
  all_tie, _ = losses.weighted_mo_dpo(lr_a, lr_b, jnp.zeros((1, 3)), w, beta=0.1)
  assert float(all_tie) == 0.0


def test_pair_signs_ties_and_mask():
  s = losses.pair_signs(jnp.array([[1.0, 2.0, 3.0, 0.5]]), jnp.array([[0.0, 2.05, 3.0, 9.0]]),
                        mask_BxK=jnp.array([[1, 1, 1, 0]]), tie_eps=0.1)
  np.testing.assert_array_equal(np.asarray(s), [[1.0, 0.0, 0.0, 0.0]])
  s0 = losses.pair_signs(jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 2.05]]))
  np.testing.assert_array_equal(np.asarray(s0), [[1.0, -1.0]])


# ------------------------------------------------------------------ MODPO

def test_modpo_k1_is_dpo_scaled_by_inverse_w0():
  lr_w, lr_l = jnp.array([0.7, -0.2]), jnp.array([0.1, 0.4])
  w = jnp.array([[0.5], [0.25]])
  loss, _ = losses.modpo(lr_w, lr_l, w, jnp.zeros((2, 0)), beta=0.1)
  want = np.mean([softplus(-0.1 * 0.6 / 0.5), softplus(-0.1 * -0.6 / 0.25)])
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_modpo_hand_value_both_margin_shapes_and_clamp():
  lr_w, lr_l = jnp.array([1.0]), jnp.array([0.0])         # beta 0.1 -> 0.1
  w = jnp.array([[0.5, 0.3, 0.2]])
  # margin term 0.3 * 1 + 0.2 * (-2) = -0.1 -> z = (0.1 + 0.1) / 0.5 = 0.4
  want = softplus(-0.4)
  full, met = losses.modpo(lr_w, lr_l, w, jnp.array([[99.0, 1.0, -2.0]]), beta=0.1)
  short, _ = losses.modpo(lr_w, lr_l, w, jnp.array([[1.0, -2.0]]), beta=0.1)
  np.testing.assert_allclose([float(full), float(short)], [want, want], rtol=1e-6)
  np.testing.assert_allclose(float(met["margin_term"]), -0.1, rtol=1e-5)
  assert float(met["accuracy"]) == 1.0
  # w0 = 0 is clamped to 1e-2: z = (0.1 - 1.0 * 1.0) / 0.01 = -90
  w0 = jnp.array([[0.0, 1.0, 0.0]])
  clamped, met0 = losses.modpo(lr_w, lr_l, w0, jnp.array([[1.0, 0.0]]), beta=0.1)
  np.testing.assert_allclose(float(clamped), softplus(90.0), rtol=1e-6)
  assert float(met0["w0_clamped_fraction"]) == 1.0
  g = jax.grad(lambda mm: losses.modpo(lr_w, lr_l, w, mm, beta=0.1)[0])(jnp.array([[1.0, -2.0]]))
  assert np.all(np.asarray(g) == 0.0)
  with pytest.raises(ValueError, match="margins"):
    losses.modpo(lr_w, lr_l, w, jnp.zeros((1, 5)), beta=0.1)


def test_modpo_fits_objective_zero_on_its_own_pairs_only():
  """MODPO's DPO term is fit on objective 0's preference pairs: a pair with no objective-0 label is
  left out (counted by `pairs`), a pair whose rejected response wins on objective 0 is reversed."""
  lr_w, lr_l = jnp.array([1.0, 0.5, -0.3]), jnp.array([0.0, 0.2, 0.4])
  w = jnp.array([[0.5, 0.5], [0.4, 0.6], [0.8, 0.2]])
  margins = jnp.array([[0.0, 1.0], [0.0, -0.5], [0.0, 2.0]])
  label0 = jnp.array([1.0, 0.0, -1.0])
  loss, met = losses.modpo(lr_w, lr_l, w, margins, beta=0.1, label0_B=label0)
  z0 = (0.1 * 1.0 - 0.5 * 1.0) / 0.5
  z2 = -((0.1 * -0.7) - 0.2 * 2.0) / 0.8                   # reversed: s_0 = -1
  np.testing.assert_allclose(float(loss), (softplus(-z0) + softplus(-z2)) / 2, rtol=1e-6)
  assert float(met["pairs"]) == 2.0
  # every pair entering (the old behaviour) gives a different loss and counts 3 rows
  all_rows, met_all = losses.modpo(lr_w, lr_l, w, margins, beta=0.1)
  assert float(met_all["pairs"]) == 3.0 and abs(float(all_rows) - float(loss)) > 1e-3
  # the left-out row gets no gradient
  g = jax.grad(lambda a: losses.modpo(a, lr_l, w, margins, beta=0.1, label0_B=label0)[0])(lr_w)
  assert float(g[1]) == 0.0 and float(g[0]) != 0.0 and float(g[2]) != 0.0
  # padding and the label combine: a padded labelled row is out too
  _, met_pad = losses.modpo(lr_w, lr_l, w, margins, beta=0.1, label0_B=label0, mask_B=jnp.array([0.0, 1.0, 1.0]))
  assert float(met_pad["pairs"]) == 1.0


# ------------------------------------------------------------------ SFT

def test_sft_token_mean_and_per_sequence():
  logits = np.zeros((2, 3, 4), np.float32)
  logits[0, 0] = [math.log(3), 0.0, 0.0, 0.0]             # p(token 0) = 3/6 = 1/2
  tokens = np.array([[1, 0, 2], [3, 3, 3]])
  mask = np.array([[0, 1, 1], [0, 0, 1]])
  # nll: row 0 -> [log 2, log 4], row 1 -> [log 4]
  loss, met = jax.jit(losses.sft)(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), (math.log(2) + 2 * math.log(4)) / 3, rtol=1e-6)
  assert float(met["tokens"]) == 3
  seq, _ = losses.sft(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask), per_sequence=True)
  np.testing.assert_allclose(float(seq), ((math.log(2) + math.log(4)) / 2 + math.log(4)) / 2, rtol=1e-6)


# ------------------------------------------------------------------ adapter KL

def test_adapter_kl_zero_iff_equal_and_known_values():
  logits = jnp.array([[0.0, math.log(3)]])                 # f = (1/4, 3/4)
  zero, _ = losses.adapter_kl(jnp.array([[0.25, 0.75]]), logits)
  np.testing.assert_allclose(float(zero), 0.0, atol=1e-7)
  kl, _ = losses.adapter_kl(jnp.array([[0.5, 0.5]]), logits)
  np.testing.assert_allclose(float(kl), 0.5 * math.log(2) + 0.5 * math.log(2 / 3), rtol=1e-6)
  one_hot, _ = losses.adapter_kl(jnp.array([[1.0, 0.0]]), jnp.zeros((1, 2)))   # 0 log 0 = 0
  np.testing.assert_allclose(float(one_hot), math.log(2), rtol=1e-6)
  assert float(kl) > 0


def test_adapter_kl_gradient_is_f_minus_target():
  w = jnp.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
  z = jnp.array([[0.1, -0.4, 1.2], [2.0, 0.0, -1.0]])
  g = jax.grad(lambda zz: losses.adapter_kl(w, zz)[0])(z)
  f = np.exp(np.asarray(z)) / np.exp(np.asarray(z)).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(g), (f - np.asarray(w)) / 2, rtol=1e-5, atol=1e-7)  # mean over 2


def test_adapter_kl_metrics_top1_and_spearman_with_ties():
  w = jnp.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3]])
  f = jnp.array([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
  _, met = jax.jit(losses.adapter_kl)(w, jnp.log(f))
  # top-1: row0 0 vs 2 no, row1 0 vs 0 yes, row2 0 vs 0 (tie -> first) yes
  np.testing.assert_allclose(float(met["top1_agreement"]), 2 / 3, rtol=1e-6)
  # row0: reversed ranks -> -1; row1: ranks (2.5, 2.5, 1) vs (3, 2, 1) -> 1.5 / sqrt(1.5 * 2);
  # row2: constant target, undefined, excluded
  want = (-1.0 + 1.5 / math.sqrt(3.0)) / 2
  np.testing.assert_allclose(float(met["spearman"]), want, rtol=1e-5)
  assert float(met["spearman_defined"]) == 2
