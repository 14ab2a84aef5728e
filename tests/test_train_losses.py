"""The engine's own losses against hand computations, and a short toy-DPO run through the trainer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.configs import load_config
from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.train.data import SyntheticPairs
from pro_jax.train.losses import lm_loss, token_logprobs, toy_dpo_loss
from pro_jax.train.losses import model_sequence_logprob as sequence_logprob


def jit_init(model):
  """`init_variables` compiled (eager Flax init dispatches op by op: seconds on a busy CPU)."""
  return jax.jit(lambda key: init_variables(model, key))

MCFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, mlp_dim=48)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logprobs_and_lm_loss_match_hand_computation():
  model = Transformer(MCFG)
  v = jit_init(model)(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 40, size=(3, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]], np.int32)
  loss_mask = mask.copy()
  loss_mask[:, :2] = 0  # a 2-token prompt
  logits = np.asarray(jax.jit(model.apply)(v, tokens, attention_mask_BxL=mask).logits, np.float64)
  lp = log_softmax(logits)
  want = np.zeros((3, 7))
  for b in range(3):
    for t in range(1, 7):
      want[b, t] = lp[b, t - 1, tokens[b, t]]
  np.testing.assert_allclose(np.asarray(token_logprobs(jnp.asarray(logits, jnp.float32), tokens)), want, atol=1e-5)
  loss, metrics = jax.jit(lm_loss(model))(v, {}, {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}, None)
  assert float(metrics["loss_weight"]) == loss_mask.sum() == 11
  assert float(loss) == pytest.approx(-(want * loss_mask).sum() / loss_mask.sum(), abs=1e-5)
  pred = logits[:, :-1].argmax(-1)
  acc = ((pred == tokens[:, 1:]) * loss_mask[:, 1:]).sum() / loss_mask.sum()
  assert float(metrics["accuracy"]) == pytest.approx(acc)


def test_toy_dpo_loss_matches_the_sigmoid_dpo_formula():
  model = Transformer(MCFG)
  policy = jit_init(model)(jax.random.PRNGKey(0))
  ref = jit_init(model)(jax.random.PRNGKey(1))
  batch = next(SyntheticPairs(0, 4, 12, 40, prompt_len=4))
  beta = 0.3
  apply = jax.jit(model.apply)

  def seq_lp(variables, side):
    tok, m, lm = batch[f"{side}_tokens"], batch[f"{side}_mask"], batch[f"{side}_loss_mask"]
    lp = log_softmax(np.asarray(apply(variables, tok, attention_mask_BxL=m).logits, np.float64))
    return np.array([sum(lp[b, t - 1, tok[b, t]] * lm[b, t] for t in range(1, tok.shape[1]))
                     for b in range(tok.shape[0])])

  margin = beta * ((seq_lp(policy, "chosen") - seq_lp(ref, "chosen")) -
                   (seq_lp(policy, "rejected") - seq_lp(ref, "rejected")))
  want = np.mean(np.log1p(np.exp(-margin)))  # -log sigmoid
  for concat in (True, False):
    loss, m = jax.jit(toy_dpo_loss(model, model, beta=beta, concat_pairs=concat))(policy, {"ref": ref}, batch, None)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(m["accuracy"]) == pytest.approx(np.mean(margin > 0))
    assert float(m["margin"]) == pytest.approx(margin.mean(), rel=1e-4, abs=1e-6)
  # against itself the margin is 0 and the loss log 2
  loss, _ = jax.jit(toy_dpo_loss(model, model))(policy, {"ref": policy}, batch, None)
  assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
  np.testing.assert_allclose(
      np.asarray(sequence_logprob(model, policy, batch["chosen_tokens"], batch["chosen_mask"],
                                  batch["chosen_loss_mask"])), seq_lp(policy, "chosen"), rtol=1e-5)


def test_toy_dpo_trains_against_its_frozen_reference(tmp_path):
  from pro_jax.train.tasks import build_task
  from pro_jax.train.trainer import train
  cfg = load_config("tiny_dpo", ["--config.total_steps=12", "--config.optim.lr=3e-3", "--config.log.every_steps=1",
                                 "--config.log.tensorboard=false", "--config.mesh.data=2"])
  r = train(cfg, tmp_path / "dpo", build_task(cfg))
  from pro_jax.train.logging import read_metrics
  m = read_metrics(tmp_path / "dpo")
  assert m[0]["train/loss"] == pytest.approx(math.log(2), abs=2e-3)  # reference = initial policy (bf16 copy)
  assert m[-1]["train/loss"] < 0.6 and m[-1]["train/accuracy"] > 0.7
  assert r.state.params["params"]["embed"].dtype == jnp.float32
