"""Policy loss plug-ins (the engine-facing wiring of the PRO losses), weights and conditioned data.

Expected values are computed here from direct forward passes on each side separately and the
formulas of PRO_METHOD.md written out in numpy; the plug-ins run both sides as one [2B, L] batch.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pro_jax.models import LoRAConfig, ModelConfig, Transformer, init_variables
from pro_jax.stages.policy import (best_of_examples, condition_prompt, pair_logps, policy_loss,
                                resolve_example_weights, ric_examples)
from pro_jax.pro.weights import parse_weights_text

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=32)


def _batch(rng, B=4, L=10, K=3):
  r = np.random.default_rng(rng)
  out = {}
  for side in ("chosen", "rejected"):
    t = r.integers(3, 32, size=(B, L)).astype(np.int32)
    lengths = r.integers(6, L + 1, size=B)
    m = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    lm = m.copy()
    lm[:, :4] = 0  # 4 prompt tokens
    out[f"{side}_tokens"], out[f"{side}_mask"], out[f"{side}_loss_mask"] = t * m, m, lm
  out["example_id"] = np.arange(B, dtype=np.int32)
  out["example_id"][-1] = -1  # a filler row: must not count
  out["weights"] = r.dirichlet(np.ones(K), size=B).astype(np.float32)
  out["reward_chosen"] = r.normal(size=(B, K)).astype(np.float32)
  out["reward_rejected"] = r.normal(size=(B, K)).astype(np.float32)
  out["reward_rejected"][0, 1] = out["reward_chosen"][0, 1]  # a tie: no term
  out["pair_objectives"] = np.ones((B, K), np.float32)
  return out


def _seq_logp(model, variables, tokens, mask, loss_mask):
  logits = np.asarray(model.apply(variables, jnp.asarray(tokens), jnp.asarray(mask)).logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  lp = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      lp[b, t] = logits[b, t - 1, tokens[b, t]] - logz[b, t - 1]
  return (lp * loss_mask).sum(1)


def _side_logps(model, variables, batch):
  return (_seq_logp(model, variables, batch["chosen_tokens"], batch["chosen_mask"], batch["chosen_loss_mask"]),
          _seq_logp(model, variables, batch["rejected_tokens"], batch["rejected_mask"], batch["rejected_loss_mask"]))


def _logsig(x):
  return -np.logaddexp(0.0, -x)


@pytest.fixture(scope="module")
def models():
  model = Transformer(CFG)
  pol = init_variables(model, jax.random.PRNGKey(0))
  ref = init_variables(model, jax.random.PRNGKey(1))
  return model, pol, ref


def test_pair_logps_equals_separate_forwards(models):
  model, pol, _ = models
  b = _batch(0)
  pc, pr = pair_logps(model, pol, b)
  ec, er = _side_logps(model, pol, b)
  np.testing.assert_allclose(pc, ec, atol=2e-4)
  np.testing.assert_allclose(pr, er, atol=2e-4)


def test_wdpo_plugin_matches_hand_formula(models):
  model, pol, ref = models
  b, beta = _batch(1), 0.3
  loss, metrics = policy_loss("wdpo", model, beta=beta)(pol, {"ref": ref}, b, jax.random.PRNGKey(0))
  pc, pr = _side_logps(model, pol, b)
  rc, rr = _side_logps(model, ref, b)
  s = np.sign(b["reward_chosen"] - b["reward_rejected"])
  z = s * beta * ((pc - rc) - (pr - rr))[:, None]
  per = (b["weights"] * np.abs(s) * -_logsig(z)).sum(1)
  real = b["example_id"] >= 0
  assert float(loss) == pytest.approx(per[real].mean(), rel=1e-4)
  assert float(metrics["loss_weight"]) == real.sum()


def test_modpo_plugin_matches_hand_formula(models):
  model, pol, ref = models
  b, beta = _batch(2), 0.5
  loss, _ = policy_loss("modpo", model, beta=beta)(pol, {"ref": ref}, b, jax.random.PRNGKey(0))
  pc, pr = _side_logps(model, pol, b)
  rc, rr = _side_logps(model, ref, b)
  w = b["weights"]
  margins = (b["reward_chosen"] - b["reward_rejected"])[:, 1:]
  z = (beta * ((pc - rc) - (pr - rr)) - (w[:, 1:] * margins).sum(1)) / np.maximum(w[:, 0], 1e-2)
  real = b["example_id"] >= 0
  assert float(loss) == pytest.approx((-_logsig(z))[real].mean(), rel=1e-4)


def test_modpo_plugin_fits_objective_zero_on_its_own_pairs(models):
  """MODPO's DPO term sees only the pairs labelled for objective 0 (pair_objectives[:, 0]); a pair
  whose rejected response wins on objective 0 is used reversed. Before, every pair entered."""
  model, pol, ref = models
  b, beta = _batch(2), 0.5
  b["pair_objectives"] = np.array([[1, 1, 0], [0, 1, 1], [-1, 0, 1], [1, 0, 0]], np.float32)  # row 3: filler
  loss, metrics = policy_loss("modpo", model, beta=beta)(pol, {"ref": ref}, b, jax.random.PRNGKey(0))
  pc, pr = _side_logps(model, pol, b)
  rc, rr = _side_logps(model, ref, b)
  w = b["weights"]
  margins = (b["reward_chosen"] - b["reward_rejected"])[:, 1:]
  s0 = b["pair_objectives"][:, 0]
  z = s0 * (beta * ((pc - rc) - (pr - rr)) - (w[:, 1:] * margins).sum(1)) / np.maximum(w[:, 0], 1e-2)
  seen = (b["example_id"] >= 0) & (s0 != 0)
  assert seen.sum() == 2
  assert float(metrics["pairs"]) == 2 and float(metrics["loss_weight"]) == 2
  assert float(loss) == pytest.approx((-_logsig(z))[seen].mean(), rel=1e-4)
  z_all = (beta * ((pc - rc) - (pr - rr)) - (w[:, 1:] * margins).sum(1)) / np.maximum(w[:, 0], 1e-2)
  assert abs(float(loss) - (-_logsig(z_all))[b["example_id"] >= 0].mean()) > 1e-3  # the old result differs


def test_ipo_plugin_uses_length_averaged_logps(models):
  """IPO through the plug-in: TRL's (logits - 1/(2 beta))^2 on length-AVERAGED log-probs."""
  model, pol, ref = models
  b, beta = _batch(6), 0.1
  loss, _ = policy_loss("dpo", model, beta=beta, dpo_loss_type="ipo")(pol, {"ref": ref}, b, jax.random.PRNGKey(0))
  n_c, n_r = b["chosen_loss_mask"].sum(1), b["rejected_loss_mask"].sum(1)
  pc, pr = _side_logps(model, pol, b)
  rc, rr = _side_logps(model, ref, b)
  logits = (pc / n_c - pr / n_r) - (rc / n_c - rr / n_r)
  real = b["example_id"] >= 0
  assert float(loss) == pytest.approx(((logits - 1 / (2 * beta)) ** 2)[real].mean(), rel=1e-4)
  # windowed LM head: the same
  lw, _ = policy_loss("dpo", model, beta=beta, dpo_loss_type="ipo", response_window=8)(pol, {"ref": ref}, b,
                                                                                        jax.random.PRNGKey(0))
  assert float(lw) == pytest.approx(float(loss), rel=1e-4)
  with pytest.raises(ValueError, match="dpo_loss_type"):
    policy_loss("dpo", model, dpo_loss_type="kto")


def test_dpo_plugin_with_precomputed_reference_equals_frozen_reference(models):
  model, pol, ref = models
  b = _batch(3)
  fn = policy_loss("dpo", model, beta=0.1)
  l_frozen, _ = fn(pol, {"ref": ref}, b, jax.random.PRNGKey(0))
  rc, rr = _side_logps(model, ref, b)
  b2 = dict(b, ref_chosen_logp=rc.astype(np.float32), ref_rejected_logp=rr.astype(np.float32))
  l_batch, _ = policy_loss("dpo", model, beta=0.1, ref_key="batch")(pol, {}, b2, jax.random.PRNGKey(0))
  assert float(l_batch) == pytest.approx(float(l_frozen), rel=1e-4)
  pc, pr = _side_logps(model, pol, b)
  real = b["example_id"] >= 0
  expect = -_logsig(0.1 * ((pc - rc) - (pr - rr)))[real].mean()
  assert float(l_frozen) == pytest.approx(expect, rel=1e-4)


def test_lora_policy_uses_its_base_as_reference():
  """ref_key='base': a fresh LoRA policy equals its reference, so every non-tied term is log 2."""
  cfg = CFG.replace(lora=LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")))
  model = Transformer(cfg)
  v = init_variables(model, jax.random.PRNGKey(0))
  b = _batch(4)
  loss, _ = policy_loss("wdpo", model, beta=0.1, ref_key="base")(v, {}, b, jax.random.PRNGKey(0))
  s = np.abs(np.sign(b["reward_chosen"] - b["reward_rejected"]))
  real = b["example_id"] >= 0
  assert float(loss) == pytest.approx(((b["weights"] * s).sum(1) * np.log(2))[real].mean(), rel=1e-5)
  grads = jax.grad(lambda lora: policy_loss("wdpo", model, beta=0.1, ref_key="base")(
      {"params": v["params"], "lora": lora}, {}, b, jax.random.PRNGKey(0))[0])(v["lora"])
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_sft_plugin_is_token_mean_nll(models):
  model, pol, _ = models
  b = _batch(5)
  seq = {"tokens": b["chosen_tokens"], "mask": b["chosen_mask"], "loss_mask": b["chosen_loss_mask"]}
  loss, m = policy_loss("sft", model)(pol, {}, seq, jax.random.PRNGKey(0))
  lp = _seq_logp(model, pol, seq["tokens"], seq["mask"], seq["loss_mask"])
  assert float(loss) == pytest.approx(-lp.sum() / seq["loss_mask"].sum(), rel=1e-4)
  assert float(m["loss_weight"]) == seq["loss_mask"].sum()


def test_unknown_loss_and_reference_are_errors(models):
  model = models[0]
  with pytest.raises(ValueError, match="policy loss"):
    policy_loss("ppo2", model)
  with pytest.raises(ValueError, match="ref_key"):
    policy_loss("dpo", model, ref_key="elsewhere")


def test_resolve_example_weights():
  t = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], np.float32)
  np.testing.assert_array_equal(resolve_example_weights("target", 3, 2, targets_NxK=t), t)
  np.testing.assert_allclose(resolve_example_weights("uniform", 3, 2), np.full((3, 2), 0.5))
  np.testing.assert_allclose(resolve_example_weights("fixed:[0.3,0.7]", 3, 2), [[0.3, 0.7]] * 3)
  np.testing.assert_array_equal(resolve_example_weights("adapter", 3, 2, adapter_fn=lambda: t[::-1]), t[::-1])
  with pytest.raises(ValueError, match="needs the adapter targets"):
    resolve_example_weights("target", 3, 2)
  with pytest.raises(ValueError, match="needs a trained preference adapter"):
    resolve_example_weights("adapter", 3, 2)
  with pytest.raises(ValueError, match="expected"):
    resolve_example_weights("adapter", 3, 2, adapter_fn=lambda: t[:2])


def test_condition_prompt_and_ric_examples():
  prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "what color is the zorb ?"}]
  c = condition_prompt(prompt, [0.7, 0.2, 0.1], ["concise", "informative", "harmless"])
  assert c[:2] == prompt[:2] and prompt[2]["content"] == "what color is the zorb ?"  # no mutation
  assert c[2]["content"] == "what color is the zorb ? <w> concise 0.7 informative 0.2 harmless 0.1 </w>"
  ex = {"id": "e", "source": "s", "prompt": prompt, "responses": ["a .", "b ."]}
  rows = ric_examples([ex], [np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])], ["c", "i", "h"])
  assert [r["chosen"] for r in rows] == ["a .", "b ."]
  assert rows[1]["prompt"][-1]["content"].endswith("<w> c 0.1 i 0.1 h 0.8 </w>")


def test_best_of_examples_pick_the_best_response_for_the_shown_weights():
  z = np.array([[2.0, -1.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 1.5]])  # three specialists
  ex = {"id": "e", "source": "s", "prompt": "q ?", "responses": ["brief", "long", "safe"]}
  rows = best_of_examples([ex], [z], ["c", "i", "h"], samples_per_example=200, seed=0)
  assert len(rows) == 200
  for r in rows:
    w = parse_weights_text(r["prompt"][-1]["content"], ["c", "i", "h"])
    assert r["chosen"] == ex["responses"][int(np.argmax(z @ w))]
  assert {r["chosen"] for r in rows} == {"brief", "long", "safe"}  # the simplex is covered


def test_stage_init_copies_backbone_so_donation_keeps_the_reference():
  """On a one-device mesh the backbone's arrays already sit where the stage's params go; the stage
  init must still copy them, since the engine donates (deletes) the initialized params while a frozen
  reference built from the same backbone keeps using them (the DPO full-fine-tuning case)."""
  from pro_jax.stages.stage import StageInputs, make_task

  model = Transformer(CFG)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  backbone = jax.device_put(init_variables(model, jax.random.PRNGKey(3))["params"], one)
  # copies: a live numpy view of a CPU buffer would itself keep XLA from donating it
  expected = jax.tree.map(lambda x: np.array(x, copy=True), backbone)
  shardings = jax.tree.map(lambda _: one, jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0))))
  task = make_task("policy", None, None, None, {}, init=lambda rng: init_variables(model, rng),
                   inputs=StageInputs(init=backbone))  # the stage's init: fresh variables + the grafted backbone
  variables = task.init_variables(jax.random.PRNGKey(0), shardings=shardings)
  jax.tree.map(lambda x, e: np.testing.assert_array_equal(np.array(x, copy=True), e), variables["params"], expected)
  jax.jit(lambda v: jax.tree.map(lambda x: x * 2, v), donate_argnums=(0,))(variables)  # as init_state does
  assert not any(x.is_deleted() for x in jax.tree.leaves(backbone))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, backbone), expected)


def test_response_window_logps_equal_the_hand_computed_ones(models):
  """The LM head on each row's response window only (pair_logps(response_window=R)) gives the same
  summed log-probs as the direct forward over every position; R is the longest response (6 here:
  4 prompt tokens, rows of 6-10 tokens)."""
  model, pol, _ = models
  batch = _batch(5)
  want_c, want_r = _side_logps(model, pol, batch)
  for window in (6, 7, 9, 50):  # exactly the longest response, wider, wider than L - 1
    got_c, got_r = pair_logps(model, pol, batch, response_window=window)
    np.testing.assert_allclose(np.asarray(got_c), want_c, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_r), want_r, rtol=2e-5, atol=2e-5)
  # the model's logit_positions_BxR picks exactly those rows of the full logits
  tokens, mask = jnp.asarray(batch["chosen_tokens"]), jnp.asarray(batch["chosen_mask"])
  pos = jnp.asarray(np.random.default_rng(0).integers(0, tokens.shape[1], size=(tokens.shape[0], 3)), jnp.int32)
  full = np.asarray(model.apply(pol, tokens, mask).logits)
  picked = np.asarray(model.apply(pol, tokens, mask, logit_positions_BxR=pos).logits)
  np.testing.assert_allclose(picked, np.take_along_axis(full, np.asarray(pos)[..., None], axis=1), atol=1e-5)


def test_response_window_too_short_gives_nan_not_a_truncated_sum(models):
  model, pol, _ = models
  batch = _batch(5)
  lengths = batch["chosen_loss_mask"].sum(1)
  got_c, _ = pair_logps(model, pol, batch, response_window=5)
  got_c = np.asarray(got_c)
  assert np.all(np.isnan(got_c[lengths > 5])) and np.all(np.isfinite(got_c[lengths <= 5]))
  assert (lengths > 5).any() and (lengths <= 5).any()


def test_dpo_plugin_with_response_window_equals_the_full_lm_head(models):
  model, pol, ref = models
  batch = _batch(6)
  full = policy_loss("wdpo", model, beta=0.2)(pol, {"ref": ref}, batch, None)
  win = policy_loss("wdpo", model, beta=0.2, response_window=6)(pol, {"ref": ref}, batch, None)
  np.testing.assert_allclose(float(win[0]), float(full[0]), rtol=1e-5)
  g_full = jax.grad(lambda p: policy_loss("dpo", model)(p, {"ref": ref}, batch, None)[0])(pol)
  g_win = jax.grad(lambda p: policy_loss("dpo", model, response_window=6)(p, {"ref": ref}, batch, None)[0])(pol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               g_win, g_full)


def test_ric_reward_conditioning_rows_and_deployment_prompt():
  """RiC proper: training rows conditioned on each response's own normalized rewards; at evaluation a
  weight vector becomes RiC's target rewards (l2 map over the training range) in the prompt."""
  from pro_jax.stages.evaluate import Policy
  from pro_jax.stages.policy import reward_conditioned_examples

  names = ["concise", "informative", "harmless"]
  ex = {"id": "a", "source": "s", "prompt": [{"role": "user", "content": "what color is the zorb ?"}],
        "responses": ["the zorb is red .", "sorry , i can not help with that ."]}
  z = np.array([[0.5, -1.23, 0.0], [1.0, 2.04, -0.04]])
  rows = reward_conditioned_examples([ex], [z], names)
  assert [r["chosen"] for r in rows] == ex["responses"]
  assert rows[0]["prompt"][-1]["content"] == "what color is the zorb ? <r> concise 0.5 informative -1.2 harmless 0.0 </r>"
  assert rows[1]["prompt"][-1]["content"] == "what color is the zorb ? <r> concise 1.0 informative 2.0 harmless 0.0 </r>"
  pol = Policy("p", None, None, conditioned=True, reward_map={"low": [-2.0] * 3, "high": [2.0] * 3, "method": "l2"})
  # w = (1, 0, 0): w / |w| = w -> (2, -2, -2); w = (0.6, 0.8, 0): (0.4, 1.2, -2)
  assert pol.condition(ex["prompt"], [1.0, 0.0, 0.0], names)[-1]["content"].endswith(
      "<r> concise 2.0 informative -2.0 harmless -2.0 </r>")
  assert pol.condition(ex["prompt"], [0.6 / 1.4, 0.8 / 1.4, 0.0], names)[-1]["content"].endswith(
      "<r> concise 0.4 informative 1.2 harmless -2.0 </r>")
