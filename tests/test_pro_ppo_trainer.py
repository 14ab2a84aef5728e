"""MORLHF-PPO: the loss plug-in against numpy, the rollout bookkeeping against hand computations, and
short PPO runs on the synthetic task (reward improves, one compile, exact resume after SIGTERM)."""

import functools
import json
import os
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pro_jax import sharding as shd
from pro_jax.data import synthetic
from pro_jax.data.pipeline import Pipeline, PipelineConfig
from pro_jax.models import LoRAConfig, ModelConfig, Transformer, init_variables
from pro_jax.models.generate import generate
from pro_jax.stages import ppo as PT
from pro_jax.pro.normalize import fit_norm_stats
from pro_jax.stages.policy import policy_loss
from pro_jax.stages.stage import engine_config

TEMP = 0.7


# ---------------------------------------------------------------------------------------------
# numpy references


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _direct(value_head=True, seed=0):
  """Per-response-token log-probs / values / entropy of `_rows()` under `_tiny_model(value_head, seed)`,
  by a plain model.apply and numpy."""
  model, variables = _tiny_model(value_head, seed)
  seq, mask, rmask = _rows()
  n = rmask.shape[1]
  out = jax.jit(model.apply)(variables, jnp.asarray(seq), jnp.asarray(mask))
  logits = np.asarray(out.logits, np.float64)
  values = np.asarray(out.values if out.values is not None else np.zeros(seq.shape), np.float64)
  P = seq.shape[1] - n
  logp, vals, ent = (np.zeros((seq.shape[0], n)) for _ in range(3))
  for b in range(seq.shape[0]):
    for i in range(n):
      lp = _log_softmax(logits[b, P + i - 1] / TEMP)   # the slot before response token i predicts it
      logp[b, i] = lp[seq[b, P + i]]
      vals[b, i] = values[b, P + i - 1]
      ent[b, i] = -(np.exp(lp) * lp).sum()
  return logp, vals, ent


@functools.lru_cache(maxsize=None)
def _tiny_model(value_head=True, seed=0):
  """The policy (value head, LoRA with non-zero adapters) or, with value_head=False, a plain reference."""
  lora = LoRAConfig(rank=2, targets=("q_proj", "v_proj")) if value_head else None
  cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=32,
                    value_head=value_head, lora=lora)
  model = Transformer(cfg)
  variables = _init(model, seed)
  if lora is not None:  # a trained-looking adapter (b = 0 at init would make it a no-op)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 8))
    variables["lora"] = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), variables["lora"])
  return model, variables


def _init(model, seed):
  return jax.jit(lambda r: init_variables(model, r))(jax.random.key(seed))  # jitted: much faster than eager


@functools.lru_cache(maxsize=None)
def _rollout_fn():
  """The jitted rollout function of the tiny policy and reference (compiled once for these tests)."""
  return jax.jit(PT.rollout_fn(_tiny_model()[0], _tiny_model(value_head=False, seed=1)[0], temperature=TEMP,
                               gamma=1.0, lam=0.95, whiten_advantages=True))


def _rows():
  """3 rollout rows, P = 3 prompt slots (left-padded), N = 4 response slots:
  row 0 ends with EOS (=2) at i = 1, row 1 is truncated (no EOS), row 2 is EOS at i = 0."""
  prompt = np.array([[0, 5, 6], [7, 8, 9], [0, 0, 4]])
  pmask = (np.arange(3)[None] >= np.array([[1], [0], [2]])).astype(np.int32)
  resp = np.array([[11, 2, 0, 0], [3, 12, 13, 14], [2, 0, 0, 0]])
  rmask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.int32)
  return np.concatenate([prompt, resp], 1).astype(np.int32), np.concatenate([pmask, rmask], 1), rmask


# ---------------------------------------------------------------------------------------------
# the loss plug-in


def test_ppo_loss_matches_numpy_clipped_objective():
  model, variables = _tiny_model()
  seq, smask, rmask = _rows()
  logp, vals, ent = _direct()
  rng = np.random.default_rng(0)
  m = rmask.astype(np.float64)
  old_logp = logp + rng.choice([-0.5, -0.05, 0.05, 0.5], size=logp.shape)  # ratios in and out of the clip range
  adv = rng.normal(size=logp.shape)
  old_values = vals + rng.choice([-0.4, 0.05, 0.4], size=vals.shape)
  returns = rng.normal(size=vals.shape)
  batch = dict(sequences=seq, sequence_mask=smask, response_mask=rmask, old_logp=old_logp, old_values=old_values,
               advantages=adv, returns=returns)
  batch = {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else jnp.int32) for k, v in batch.items()}
  clip, vf_coef, vf_clip, ent_coef = 0.2, 0.5, 0.2, 0.01
  loss_fn = PT.ppo_loss(model, clip, vf_coef, vf_clip, ent_coef, temperature=TEMP)
  # the trained tree in the LoRA layout: the value head rides in the "lora" collection
  trained = PT.to_ppo_layout(variables, "lora")
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trained, {}, batch, jax.random.key(0))
  assert float(jnp.abs(grads["lora"][PT.VALUE_HEAD]["kernel"]).sum()) > 0  # the value head trains with LoRA

  mmean = lambda x: (x * m).sum() / m.sum()
  ratio = np.exp(logp - old_logp)
  pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)
  pg_loss = mmean(np.maximum(pg1, pg2))
  v_clipped = np.clip(vals, old_values - vf_clip, old_values + vf_clip)
  vf_loss = 0.5 * mmean(np.maximum((vals - returns) ** 2, (v_clipped - returns) ** 2))
  entropy = mmean(ent)
  assert 0.1 < mmean((pg2 > pg1).astype(float)) < 0.9  # the test exercises both branches
  np.testing.assert_allclose(float(loss), pg_loss + vf_coef * vf_loss - ent_coef * entropy, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["policy_loss"]), pg_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["value_loss"]), vf_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["entropy"]), entropy, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["clipfrac"]), mmean((pg2 > pg1).astype(float)), atol=1e-6)
  np.testing.assert_allclose(float(metrics["approx_kl"]), 0.5 * mmean((logp - old_logp) ** 2), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["value_clipfrac"]),
                             mmean(((v_clipped - returns) ** 2 > (vals - returns) ** 2).astype(float)), atol=1e-6)
  assert float(metrics["loss_weight"]) == rmask.sum() == 7

  with pytest.raises(ValueError, match="value head"):
    PT.ppo_loss(_tiny_model(value_head=False)[0], clip, vf_coef, vf_clip)


def test_lora_layout_round_trip():
  v = {"params": {"embed": 1, PT.VALUE_HEAD: {"kernel": 2}}, "lora": {"layers": {"a": 3}}}
  moved = PT.to_ppo_layout(v, "lora")
  assert PT.VALUE_HEAD not in moved["params"] and moved["lora"][PT.VALUE_HEAD] == {"kernel": 2}
  assert PT.policy_variables(moved) == v
  assert PT.to_ppo_layout(v, "full") == v and PT.policy_variables(v) == v


# ---------------------------------------------------------------------------------------------
# rollout bookkeeping


def test_rollout_rewards_kl_gae_and_masks():
  _, variables = _tiny_model(seed=0)
  _, ref_vars = _tiny_model(value_head=False, seed=1)
  seq, smask, rmask = _rows()
  scores = np.array([1.0, -2.0, 0.5], np.float32)
  beta, gamma, lam = 0.3, 1.0, 0.95  # as in _rollout_fn
  train, arrays, stats = jax.device_get(_rollout_fn()(variables, ref_vars, seq, smask, rmask, scores,
                                                     np.float32(beta)))

  logp, vals, _ = _direct()
  ref_logp, _, _ = _direct(value_head=False, seed=1)
  m = rmask.astype(np.float64)
  want = -beta * (logp - ref_logp) * m
  last = [1, 3, 0]  # EOS-terminated at 1, truncated (last slot), EOS at the first token
  for b, t in enumerate(last):
    want[b, t] += scores[b]
  np.testing.assert_allclose(arrays["rewards"], want, rtol=1e-4, atol=1e-5)
  assert np.all(arrays["rewards"][m == 0] == 0)
  np.testing.assert_allclose(train["old_logp"], logp * m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(train["old_values"], vals * m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(arrays["kl"], ((logp - ref_logp) * m).sum(1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["kl"], ((logp - ref_logp) * m).sum(1).mean(), rtol=1e-4, atol=1e-5)

  # GAE by hand on each row's response tokens (terminal after the last), then whitening over the batch
  adv = np.zeros_like(want)
  for b in range(3):
    running = 0.0
    for t in reversed(range(last[b] + 1)):
      next_v = vals[b, t + 1] if t < last[b] else 0.0
      running = want[b, t] + gamma * next_v - vals[b, t] + gamma * lam * running
      adv[b, t] = running
  np.testing.assert_allclose(train["returns"], (adv + vals) * m, rtol=1e-4, atol=1e-5)
  flat = adv[m > 0]
  whitened = (adv - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8) * m
  np.testing.assert_allclose(train["advantages"], whitened, rtol=1e-4, atol=1e-4)
  assert np.all(train["advantages"][m == 0] == 0) and np.all(train["returns"][m == 0] == 0)


def test_old_logprobs_match_the_generator():
  """Teacher-forced log-probs over GenerateOutput.sequences == the KV-cache generator's own log-probs."""
  model, variables = _tiny_model()
  _, ref_vars = _tiny_model(value_head=False, seed=1)
  seq, smask, _ = _rows()
  out = generate(Transformer(model.config.replace(value_head=False)), variables, seq[:, :3], smask[:, :3],
                 max_new_tokens=4, rng=jax.random.key(3), temperature=TEMP, eos_token_id=2, pad_token_id=0)
  rows = [np.asarray(x) for x in (out.sequences_BxT, out.sequence_mask_BxT, out.response_mask_BxN)]
  train, _, _ = _rollout_fn()(variables, ref_vars, *rows, np.zeros(3, np.float32), np.float32(0.2))
  mask = np.asarray(out.response_mask_BxN)
  np.testing.assert_allclose(np.asarray(train["old_logp"]), np.asarray(out.logprobs_BxN) * mask, atol=2e-5)


def test_rollout_indices_cover_every_prompt_each_epoch_and_resume_by_position():
  a = np.concatenate([PT.rollout_indices(10, 4, 0, p) for p in range(0, 20, 4)])
  assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
  assert not np.array_equal(a[:10], a[10:20])  # a new permutation per epoch
  np.testing.assert_array_equal(PT.rollout_indices(10, 4, 0, 8), a[8:12])  # crosses the epoch boundary


# ---------------------------------------------------------------------------------------------
# end to end on the synthetic task

ITERATIONS = 12
SFT_STEPS = 400


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A small synthetic world (4 creatures), its tokenizer, rewards, z-score statistics, and a tiny
  policy SFT-trained on every candidate response (400 steps of batch 32 with a plain optax loop:
  enough for well-formed answers of every kind, so PPO has something to choose between)."""
  from transformers import AutoTokenizer

  tcfg = synthetic.SyntheticTaskConfig(seed=0, n_train=512, n_eval=0, n_entities=4)
  examples = synthetic.generate_task(tcfg)["train"]
  tok = AutoTokenizer.from_pretrained(str(synthetic.build_tokenizer(tcfg, tmp_path_factory.mktemp("tok"))))
  scorer = synthetic.SyntheticRewards(tcfg)
  raw = scorer.score([e["prompt"] for e in examples for _ in e["responses"]],
                     [r for e in examples for r in e["responses"]])
  norm = fit_norm_stats(raw, tcfg.objectives)

  mcfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, mlp_dim=96, max_seq_len=64,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  model = Transformer(mcfg)
  pc = PipelineConfig(kind="sequence", batch_size=32, max_prompt_len=16, max_response_len=40, bucket_multiple=8,
                      sequence_responses="responses", strict=False, shuffle=True, seed=0, num_epochs=None,
                      static_shapes=True)
  batches = Pipeline(examples, tok, pc).iterator()
  params = _init(model, 0)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, SFT_STEPS, 3e-4))
  sft = policy_loss("sft", model)

  @jax.jit
  def step(p, o, b):
    (loss, _), g = jax.value_and_grad(lambda p: sft(p, None, b, None), has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  opt = tx.init(params)
  for _ in range(SFT_STEPS):
    b = next(batches)
    params, opt, loss = step(params, opt, {k: b[k] for k in ("tokens", "mask", "loss_mask")})
  assert float(loss) < 0.8
  mesh = shd.make_mesh(1, 2, 1, devices=jax.devices()[:2])  # the policy and the step sharded over 2 devices
  return types.SimpleNamespace(tcfg=tcfg, examples=examples, tok=tok, scorer=scorer, norm=norm, mcfg=mcfg,
                               params=params, mesh=mesh)


def _engine_cfg():
  return engine_config(None, **{"optim.lr": 1e-3, "optim.warmup_steps": 0, "optim.decay": "constant",
                                "optim.weight_decay": 0.0, "optim.clip_norm": 0.5, "checkpoint.every_steps": 4,
                                "checkpoint.keep": 2, "log.tensorboard": False, "log.progress": False})


KL_AFTER_UPDATES = 0.05  # mean per-response KL(pi || pi_ref) of the last rollouts; calibrated below
PPO = PT.PPOConfig(iterations=ITERATIONS, rollout_batch=64, minibatch=32, ppo_epochs=2, max_prompt_len=16,
                   max_new_tokens=40, temperature=TEMP, kl_coef=0.05, kl_target=3.0)


def _run(syn, workdir, weights, **kw):
  return PT.run_ppo(_engine_cfg(), workdir, policy=(syn.mcfg, syn.params), prompts=syn.examples, tokenizer=syn.tok,
                    scorer=syn.scorer, norm=syn.norm, weights=weights, ppo=PPO, mesh=syn.mesh, **kw)


def _fixed_weights(syn):
  return np.tile(np.array([[0.8, 0.1, 0.1]], np.float32), (len(syn.examples), 1))  # mostly "concise"


@pytest.fixture(scope="module")
def fixed_run(world, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ppo_fixed")
  return _run(world, workdir, _fixed_weights(world)), workdir


def _improvement(history):
  r = [h["reward/scalarized"] for h in history]
  print("scalarized reward per iteration:", np.round(r, 3).tolist())
  return float(np.mean(r[-3:]) - r[0])


def test_ppo_fixed_weights_raises_the_reward(fixed_run):
  result, workdir = fixed_run
  assert result.status == "done" and result.iteration == ITERATIONS and len(result.history) == ITERATIONS
  assert _improvement(result.history) > 0.4  # seeds 0-3 gave 0.83-0.91
  h0, hl = result.history[0], result.history[-1]
  assert hl["reward/raw/concise"] > h0["reward/raw/concise"] + 0.1 and hl["response_length"] < h0["response_length"]
  # one compile of the train step and of the rollout function across all iterations
  assert result.compiles == {"train_step": 1, "rollout": 1}
  for h in result.history:
    assert h["logp_gen_abs_diff"] < 1e-4  # teacher forcing reproduces the sampler's log-probs
    assert h["ppo/nonfinite_steps"] == 0
    # the adaptive controller: beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * rollout / horizon)
    e = np.clip(h["kl"] / PPO.kl_target - 1, -0.2, 0.2)
    np.testing.assert_allclose(h["kl_coef_next"], h["kl_coef"] * (1 + e * PPO.rollout_batch / PPO.kl_horizon),
                               rtol=1e-6)
  for a, b in zip(result.history, result.history[1:]):
    assert b["kl_coef"] == a["kl_coef_next"]
  # the reference stays frozen: the first rollout comes from the initial policy (= the reference), so
  # its KL is 0; after the updates the policy has moved away from the (unchanged) reference
  kls = [h["kl"] for h in result.history]
  print("KL per iteration:", np.round(kls, 4).tolist())
  assert abs(kls[0]) < 1e-3
  assert min(kls[-3:]) > KL_AFTER_UPDATES
  leaf = result.state.params["params"]["embed"]
  assert len(leaf.sharding.device_set) == 2
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == list(range(1, ITERATIONS + 1))


def test_ppo_per_prompt_weights_raise_the_per_prompt_utility(world, fixed_run, tmp_path):
  true_w = np.asarray([synthetic.true_weights(e) for e in world.examples], np.float32)
  result = _run(world, tmp_path / "ppo_true", true_w)
  # with w = the true weights the scalarized reward IS the per-prompt utility U = sum_k w*_k r~_k
  assert _improvement(result.history) > 0.2  # seeds 0-3 gave 0.36-0.57
  assert result.compiles == {"train_step": 1, "rollout": 1}  # same config: the compiled step is reused


def test_ppo_resume_after_sigterm_equals_an_uninterrupted_run(world, fixed_run, tmp_path):
  straight, _ = fixed_run
  workdir = tmp_path / "ppo_resume"
  stop_at = ITERATIONS // 2 + 1  # odd: not a periodic checkpoint, the SIGTERM save is the only one there

  def on_event(name, it):
    if name == "iteration_done" and it == stop_at:
      os.kill(os.getpid(), signal.SIGTERM)

  first = _run(world, workdir, _fixed_weights(world), on_event=on_event)
  assert first.status == "preempted" and first.iteration == stop_at
  second = _run(world, workdir, _fixed_weights(world))
  assert second.resumed_from == stop_at and second.status == "done" and second.iteration == ITERATIONS
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state.params)),
                  jax.tree.leaves(jax.device_get(second.state.params))):
    np.testing.assert_array_equal(a, b)
  assert second.kl_coef == straight.kl_coef
  # the resumed iterations drew the same rollouts
  for a, b in zip(straight.history[stop_at:], second.history):
    assert a["iteration"] == b["iteration"] and a["reward/scalarized"] == b["reward/scalarized"]
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == list(range(1, ITERATIONS + 1))


def test_run_ppo_rejects_bad_inputs_before_compiling(world, tmp_path):
  with pytest.raises(ValueError, match=r"weights: shape \(512, 2\)"):
    _run(world, tmp_path / "a", np.ones((512, 2), np.float32))
  bad = _fixed_weights(world)
  bad[7] = [np.nan, 0, 1]
  with pytest.raises(ValueError, match="weights: row 7"):
    _run(world, tmp_path / "b", bad)
  with pytest.raises(ValueError, match="rollout_batch=64 is not a multiple of minibatch=24"):
    PT.PPOConfig(rollout_batch=64, minibatch=24).check()
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
