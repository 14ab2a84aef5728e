"""The preference adapter: loss plug-in, held-out metrics, training end to end and load_adapter."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.stages import adapter
from pro_jax.pro.normalize import fit_norm_stats

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=64, max_seq_len=32, head="none")


def test_compute_targets_is_softmax_of_normalized_scores():
  raw = np.array([[1.0, 5.0], [3.0, 1.0], [2.0, 3.0]], np.float32)
  norm = fit_norm_stats(raw, ["a", "b"])
  z = (raw - raw.mean(0)) / raw.std(0)
  for tau in (1.0, 0.5):
    e = np.exp(z / tau)
    np.testing.assert_allclose(adapter.compute_targets(raw, norm, tau), e / e.sum(1, keepdims=True), atol=1e-5)


def test_evaluate_adapter_hand_values():
  w = np.array([[0.5, 0.5, 0.0], [0.7, 0.2, 0.1]])
  f = np.array([[0.25, 0.5, 0.25], [0.6, 0.3, 0.1]])
  m = adapter.evaluate_adapter(f, w)
  kl0 = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.5)
  kl1 = 0.7 * np.log(0.7 / 0.6) + 0.2 * np.log(0.2 / 0.3) + 0.1 * np.log(0.1 / 0.1)
  assert m["kl"] == pytest.approx((kl0 + kl1) / 2, rel=1e-9)
  assert m["top1_agreement"] == pytest.approx(0.5)  # row 0: argmax f = 1, argmax w = 0 (first of the tie)
  # row 0: ranks f (1, 2.5?) -> spearman of [0.25,.5,.25] vs [.5,.5,0]; row 1: identical order -> 1
  rf, rw = np.array([1.5, 3, 1.5]), np.array([2.5, 2.5, 1])
  rho0 = np.corrcoef(rf, rw)[0, 1]
  assert m["spearman"] == pytest.approx((rho0 + 1.0) / 2, rel=1e-6)


def test_adapter_loss_matches_hand_kl():
  backbone = Transformer(CFG)
  bvars = init_variables(backbone, jax.random.PRNGKey(0))
  adapter_mlp = adapter.AdapterMLP(3, hidden=16, layers=2)
  avars = adapter.adapter_variables(adapter_mlp, CFG.d_model, jax.random.PRNGKey(1))
  avars = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), avars)
  tokens = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], np.int32)
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
  targets = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)
  batch = {"prompt_tokens": tokens, "prompt_mask": mask, "target_weights": targets,
           "example_id": np.array([0, 1], np.int32)}
  loss, metrics = adapter.adapter_loss(adapter_mlp, backbone)(avars, {"backbone": bvars}, batch, jax.random.PRNGKey(0))
  hidden = np.asarray(backbone.apply(bvars, tokens, mask).hidden)
  feats = np.stack([hidden[b][mask[b] > 0].mean(0) for b in range(2)])
  logits = np.asarray(adapter_mlp.apply(avars, jnp.asarray(feats)), np.float64)
  logf = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  kl = (targets * (np.log(targets) - logf)).sum(1)
  assert float(loss) == pytest.approx(kl.mean(), rel=1e-4)
  assert float(metrics["loss_weight"]) == 2.0


def test_train_adapter_learns_prompt_types_and_loads_back(tmp_path):
  """Two prompt types with opposite targets: the trained adapter tells held-out prompts apart."""
  from transformers import AutoTokenizer

  from pro_jax.data import synthetic
  from pro_jax.data.pipeline import Pipeline, PipelineConfig
  from pro_jax.stages.policy import sft_task
  from pro_jax.stages.stage import StageInputs, engine_config
  from pro_jax.train.trainer import train

  tcfg = synthetic.SyntheticTaskConfig(n_train=160, n_eval=40, seed=5)
  data = synthetic.generate_task(tcfg)
  tok_dir = synthetic.build_tokenizer(tcfg, tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(str(tok_dir))
  # a backbone checkpoint: 30 SFT steps of a tiny model on the task's text
  mcfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=4, mlp_dim=64, max_seq_len=64)
  pc = PipelineConfig(kind="sequence", batch_size=16, max_prompt_len=16, max_response_len=48, bucket_multiple=8,
                      num_epochs=None, static_shapes=True)
  ecfg = engine_config(total_steps=30, batch_size=16, **{"optim.lr": 3e-3, "optim.warmup_steps": 2,
                                                          "log.progress": False, "log.tensorboard": False})
  pipe = Pipeline(data["train"], tok, pc)
  task = sft_task(ecfg, mcfg, pipe.batch_spec(), name="sft", inputs=StageInputs(data=pipe))  # fresh init
  for k, v in mcfg.to_dict().items():
    if k in ecfg.model and k not in ("lora", "rope_scaling"):
      ecfg.model[k] = v
  train(ecfg, tmp_path / "sft", task)
  # targets: one-hot-ish by prompt type (risky -> harmless, else concise)
  def targets(exs):
    return np.array([[0.1, 0.1, 0.8] if ex["prompt_type"] == "risky" else [0.8, 0.1, 0.1] for ex in exs], np.float32)
  acfg = engine_config(total_steps=120, batch_size=16, **{"optim.lr": 1e-2, "optim.warmup_steps": 5,
                                                           "log.progress": False, "log.tensorboard": False})
  pref = adapter.train_adapter(acfg, str(tmp_path / "adapter"), data["train"], targets(data["train"]), tok,
                               backbone_source=f"checkpoint:{tmp_path / 'sft'}", tokenizer_path=str(tok_dir),
                               objectives=list(tcfg.objectives), hidden=32, layers=2, max_prompt_len=16)
  prompts = [ex["prompt"] for ex in data["eval"]]
  w = pref(prompts)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
  risky = np.array([ex["prompt_type"] == "risky" for ex in data["eval"]])
  assert risky.any() and (~risky).any()
  assert w[risky, 2].mean() > 0.6 > w[~risky, 2].mean()
  m = adapter.evaluate_adapter(w, targets(data["eval"]))
  assert m["top1_agreement"] > 0.9
  again = adapter.load_adapter(str(tmp_path / "adapter"))
  np.testing.assert_allclose(again(prompts), w, atol=1e-6)
  assert again.objectives == tuple(tcfg.objectives)
  with pytest.raises(ValueError, match="not a preference-adapter run"):
    adapter.load_adapter(str(tmp_path / "sft"))


def test_adapter_encoder_with_another_vocabulary(tmp_path):
  """A feature encoder with its own vocabulary must not get the policy's token ids: an hf:DIR encoder
  without a tokenizer whose vocabulary is smaller is an error (before any compile); with its own
  tokenizer files the adapter tokenizes with (and records) that tokenizer."""
  from transformers import AutoTokenizer

  from pro_jax.data import synthetic
  from pro_jax.models import Transformer, init_variables
  from pro_jax.models.hf_io import save_hf_model
  from pro_jax.stages.stage import engine_config

  tcfg = synthetic.SyntheticTaskConfig(n_train=24, n_eval=0, seed=0)
  data = synthetic.generate_task(tcfg)["train"]
  tok_dir = synthetic.build_tokenizer(tcfg, tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(str(tok_dir))
  targets = np.full((len(data), 3), 1 / 3, np.float32)
  acfg = engine_config(total_steps=2, batch_size=8, **{"optim.warmup_steps": 1, "log.progress": False,
                                                        "log.tensorboard": False})
  small = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=64, max_seq_len=64)
  save_hf_model(tmp_path / "enc_small", small, init_variables(Transformer(small), jax.random.PRNGKey(0))["params"])
  with pytest.raises(ValueError, match="vocabulary of 64 tokens"):
    adapter.train_adapter(acfg, str(tmp_path / "a1"), data, targets, tok,
                          backbone_source=f"hf:{tmp_path / 'enc_small'}",
                          tokenizer_path=str(tok_dir), objectives=list(tcfg.objectives), hidden=8, layers=1,
                          max_prompt_len=16)
  assert not (tmp_path / "a1").exists() or not any((tmp_path / "a1").iterdir())
  own = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=4, mlp_dim=64, max_seq_len=64)
  save_hf_model(tmp_path / "enc_own", own, init_variables(Transformer(own), jax.random.PRNGKey(1))["params"],
                tokenizer=tok)
  pref = adapter.train_adapter(acfg, str(tmp_path / "a2"), data, targets, tok,
                               backbone_source=f"hf:{tmp_path / 'enc_own'}",
                               tokenizer_path="the-policy-tokenizer", objectives=list(tcfg.objectives), hidden=8,
                               layers=1, max_prompt_len=16)
  from pro_jax.train.checkpoint import load_checkpoint
  assert load_checkpoint(str(tmp_path / "a2")).extra["adapter"]["tokenizer"] == str(tmp_path / "enc_own")
  assert pref(["what color is the zorb ?"]).shape == (1, 3)
