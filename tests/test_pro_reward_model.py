"""Stage 1 reward models: the loss against numpy Bradley-Terry on directly computed scores, training a
tiny multi-head RM on the synthetic task's pairs, the scorer against a direct forward on hand-built
token arrays, load round trips, LoRA (the score head trains with the adapters), response fitting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from pro_jax.data import synthetic
from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.stages import rm
from pro_jax.stages.scoring import RewardModelScorer
from pro_jax.stages.stage import engine_config

OBJ = ("concise", "informative", "harmless")


def _np_bt(rc, rr, m):
  nll = np.log1p(np.exp(-(rc.astype(np.float64) - rr)))
  return float((nll * m).sum() / max(m.sum(), 1.0))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  cfg = synthetic.SyntheticTaskConfig(seed=0, n_train=1024, n_eval=256)
  data = synthetic.generate_task(cfg)
  tok_dir = synthetic.build_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
  return cfg, data, AutoTokenizer.from_pretrained(str(tok_dir)), tok_dir


def _tiny(tok, **kw) -> ModelConfig:
  base = dict(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, mlp_dim=64, max_seq_len=64,
              pad_token_id=tok.pad_token_id)
  base.update(kw)
  return ModelConfig(**base)


def _cfg(steps, **kw):
  upd = {"total_steps": steps, "batch_size": 32, "optim.lr": 3e-3, "optim.warmup_steps": min(10, steps),
         "optim.weight_decay": 0.0, "checkpoint.every_steps": steps, "checkpoint.keep": 1,
         "log.every_steps": max(steps, 1), "log.progress": False, "log.tensorboard": False}
  upd.update(kw)
  return engine_config(**upd)


def _pair_batch(rng, B=6, L=12, V=40):
  """A hand-built pair batch: right-padded chosen / rejected of different lengths."""
  batch = {}
  for side in ("chosen", "rejected"):
    lens = rng.integers(3, L + 1, size=B)
    tokens = rng.integers(3, V, size=(B, L)).astype(np.int32)
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
    batch[f"{side}_tokens"] = np.where(mask, tokens, 0).astype(np.int32)
    batch[f"{side}_mask"] = mask
  return batch


# ---------------------------------------------------------------------------------------------- loss


def test_rm_loss_equals_numpy_bradley_terry_on_direct_scores():
  cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, head="score",
                    num_labels=3)
  model = Transformer(cfg)
  v = init_variables(model, jax.random.PRNGKey(1))
  v["params"]["score"]["kernel"] = v["params"]["score"]["kernel"] * 50.0  # margins of a few units
  rng = np.random.default_rng(0)
  batch = _pair_batch(rng)
  pair_obj = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]], np.float32)
  batch["pair_objectives"] = pair_obj
  batch["example_id"] = np.array([0, 1, 2, 3, 4, -1], np.int32)  # the last row is padding
  apply = jax.jit(lambda v, t, m: model.apply(v, t, m).scores)
  rc = np.asarray(apply(v, batch["chosen_tokens"], batch["chosen_mask"]))  # each side on its own
  rr = np.asarray(apply(v, batch["rejected_tokens"], batch["rejected_mask"]))
  m = pair_obj.copy()
  m[5] = 0.0
  assert np.abs(rc - rr).max() > 0.5, "margins too small to test anything"
  loss_fn = rm.rm_loss(model, OBJ)
  loss, met = jax.jit(loss_fn)(v, {}, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(loss), _np_bt(rc, rr, m), rtol=2e-5)
  np.testing.assert_allclose(float(met["labels"]), m.sum())
  for k, o in enumerate(OBJ):
    acc = ((rc[:, k] > rr[:, k]) * m[:, k]).sum() / m[:, k].sum()
    np.testing.assert_allclose(float(met[f"accuracy/{o}"]), acc, rtol=1e-6)

  # masked objectives contribute nothing: with objective 2 masked everywhere, its head gets no gradient
  # and its scores can change arbitrarily without changing the loss
  batch2 = dict(batch, pair_objectives=pair_obj * np.array([1, 1, 0], np.float32))
  loss2 = jax.jit(lambda p: loss_fn(p, {}, batch2, None)[0])
  g = jax.jit(jax.grad(lambda p: loss_fn(p, {}, batch2, None)[0]))(v)
  gk = np.asarray(g["params"]["score"]["kernel"])
  assert np.all(gk[:, 2] == 0.0) and np.abs(gk[:, :2]).max() > 0
  v_big = jax.tree.map(lambda x: x, v)
  v_big["params"]["score"]["kernel"] = v["params"]["score"]["kernel"].at[:, 2].multiply(-1e3)
  np.testing.assert_allclose(float(loss2(v_big)), float(loss2(v)), rtol=1e-6)
  m2 = m * np.array([1, 1, 0])
  np.testing.assert_allclose(float(loss2(v)), _np_bt(rc, rr, m2), rtol=2e-5)


def test_lora_layout_moves_the_score_head_and_gives_the_same_loss():
  from pro_jax.models import LoRAConfig
  cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=16, head="score",
                    num_labels=2, lora=LoRAConfig(rank=2))
  model = Transformer(cfg)
  v = init_variables(model, jax.random.PRNGKey(2))
  v["lora"] = jax.tree.map(lambda x: x + 0.1, v["lora"])  # nonzero b: the adapters matter
  trained = rm._to_training_layout(v)
  assert "score" not in trained["params"] and "score" in trained["lora"]
  back = rm.rm_variables(trained)
  assert jax.tree.structure(back) == jax.tree.structure(v)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v)))
  batch = _pair_batch(np.random.default_rng(1), B=4)
  batch["pair_objectives"] = np.ones((4, 2), np.float32)
  batch["example_id"] = np.arange(4, dtype=np.int32)
  fn = rm.rm_loss(model, ("a", "b"))
  np.testing.assert_allclose(float(jax.jit(fn)(trained, {}, batch, None)[0]), float(jax.jit(fn)(v, {}, batch, None)[0]),
                             rtol=1e-6)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained_rm(task, tmp_path_factory):
  cfg, data, tok, _ = task
  workdir = tmp_path_factory.mktemp("rm")
  model, variables = rm.train_reward_model(_cfg(200), str(workdir), data["train"], tok, backbone_source="scratch",
                                           objectives=cfg.objectives, model_config=_tiny(tok), max_prompt_len=16,
                                           max_response_len=48, name="synthetic/train")
  return workdir, model, variables


def test_train_rm_from_scratch_reaches_high_held_out_accuracy(task, trained_rm, capsys):
  cfg, data, tok, _ = task
  workdir, model, variables = trained_rm
  assert model.config.head == "score" and model.config.num_labels == 3
  res = rm.evaluate_reward_model(model, variables, data["eval"], tok, objectives=cfg.objectives, max_prompt_len=16,
                                 max_response_len=48)
  # the eval pairs per objective: pair_objectives of the held-out examples
  want_count = np.abs(np.asarray([ex["pair_objectives"] for ex in data["eval"]])).sum(0)
  assert [res["count"][o] for o in cfg.objectives] == want_count.astype(int).tolist()
  with capsys.disabled():
    print("\nsynthetic RM held-out accuracy (200 steps, 3 heads):",
          {k: round(v, 3) for k, v in res["accuracy"].items()}, "pairs", res["count"])
  for o in cfg.objectives:  # chance is 0.5
    assert res["accuracy"][o] > 0.85, res
  # the labels are oriented per objective: a scorer that copies the total (hidden-weight) utility to every
  # head (no per-objective skill) is clearly worse than the trained heads on each objective
  stats = synthetic.reward_stats(data["train"])
  po = np.asarray([ex["pair_objectives"] for ex in data["eval"]])
  u = [np.asarray([(((np.asarray(ex[f]) - stats[0]) / stats[1]) * ex["true_weights"]).sum() for ex in data["eval"]])
       for f in ("reward_chosen", "reward_rejected")]
  for k, o in enumerate(cfg.objectives):
    lab = po[:, k] != 0
    copied = np.mean((u[0][lab] > u[1][lab]) == (po[lab, k] > 0))
    assert res["accuracy"][o] > copied + 0.2, (o, res["accuracy"][o], copied)
  # an untrained model of the same shape is near chance: the accuracy comes from training
  fresh = init_variables(model, jax.random.PRNGKey(7))
  base = rm.evaluate_reward_model(model, fresh, data["eval"], tok, objectives=cfg.objectives, max_prompt_len=16,
                                  max_response_len=48)
  assert base["mean_accuracy"] < 0.75


def test_reward_model_scorer_equals_direct_apply_on_hand_built_tokens(task, trained_rm):
  cfg, data, tok, _ = task
  _, model, variables = trained_rm
  ids = lambda words: tok.convert_tokens_to_ids(words)  # noqa: E731
  prompt = "what color is the zorb ?"
  resp = "the zorb is blue . it eats fish ."
  p_ids = ids(["<bos>", "<|user|>", "what", "color", "is", "the", "zorb", "?", "<|assistant|>"])
  r_ids = ids("the zorb is blue . it eats fish .".split()) + [tok.eos_token_id]
  assert tok.unk_token_id not in p_ids + r_ids
  scorer = RewardModelScorer(model, variables, tok, cfg.objectives, batch_size=4, max_prompt_len=16, max_len=32)
  L = 32
  long_prompt = "tell me all about the zorb in detail . " * 3 + prompt
  long_resp = " ".join(["the zorb is blue ."] * 8)
  lp = ids(["<bos>", "<|user|>"] + long_prompt.split() + ["<|assistant|>"])
  lr = ids(long_resp.split()) + [tok.eos_token_id]
  rows = [
      p_ids + r_ids,                                     # fits
      [lp[0]] + lp[-15:] + r_ids,                        # prompt cut from the left to 16, BOS kept
      p_ids + lr[:L - len(p_ids) - 1] + [tok.eos_token_id],  # response cut, EOS kept
  ]
  tokens = np.zeros((3, L), np.int32)
  mask = np.zeros((3, L), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = 1
  got = scorer.score([prompt, long_prompt, prompt], [resp, resp, long_resp])
  want = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens), jnp.asarray(mask)).scores)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  t2, m2 = scorer.tokenize([prompt, long_prompt, prompt], [resp, resp, long_resp])
  np.testing.assert_array_equal(t2 * m2, tokens)
  np.testing.assert_array_equal(m2, mask)
  # heads pick and order columns
  sub = RewardModelScorer(model, variables, tok, ["harmless", "concise"], heads=[2, 0], batch_size=4,
                          max_prompt_len=16, max_len=32)
  np.testing.assert_allclose(sub.score([prompt], [resp]), want[:1, [2, 0]], rtol=1e-5, atol=1e-6)


def test_load_reward_model_round_trip_gives_identical_scores(task, trained_rm, tmp_path):
  cfg, data, tok, tok_dir = task
  workdir, model, variables = trained_rm
  loaded = rm.load_reward_model(str(workdir), batch_size=16)
  assert loaded.objectives == tuple(cfg.objectives)
  assert (loaded.max_prompt_len, loaded.max_len, loaded.template) == (16, 64, "auto")
  direct = RewardModelScorer(model, variables, tok, cfg.objectives, batch_size=16, max_prompt_len=16, max_len=64)
  ex = data["eval"][:40]
  prompts = [e["prompt"] for e in ex]
  a = loaded.score(prompts, [e["chosen"] for e in ex])
  b = direct.score(prompts, [e["chosen"] for e in ex])
  np.testing.assert_array_equal(a, b)
  # the training batches' tokens: chosen scores from the pipeline's own tokens equal the scorer's
  pipe = rm.pair_pipeline(ex, tok, batch_size=40, max_prompt_len=16, max_response_len=48, train=False)
  batch = next(pipe.iterator())
  order = np.argsort(batch["example_id"])
  rc = np.asarray(jax.jit(model.apply)(variables, batch["chosen_tokens"], batch["chosen_mask"]).scores)[order]
  np.testing.assert_allclose(a, rc, rtol=1e-5, atol=1e-6)
  # re-running train_reward_model on the finished run loads it instead of training again
  m2, v2 = rm.train_reward_model(_cfg(200), str(workdir), data["train"], tok, backbone_source="scratch",
                                 objectives=cfg.objectives, model_config=_tiny(tok), max_prompt_len=16,
                                 max_response_len=48, name="synthetic/train")
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(v2), jax.tree.leaves(variables)))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    rm.load_reward_model(str(tmp_path))


def test_lora_reward_model_trains_the_head_and_adapters_only(task, trained_rm, tmp_path):
  cfg, data, tok, _ = task
  base_dir = trained_rm[0]  # a "pretrained" backbone: a finished engine run, loaded as checkpoint:DIR
  from pro_jax.models.sources import load_source
  bb = load_source(f"checkpoint:{base_dir}")
  ecfg = _cfg(10, trainable="lora", **{"model.lora.rank": 4, "model.lora.targets": ("q_proj", "v_proj")})
  model, variables = rm.train_reward_model(ecfg, str(tmp_path / "lora"), data["train"], tok,
                                           backbone_source=f"checkpoint:{base_dir}", objectives=cfg.objectives,
                                           max_prompt_len=16, max_response_len=48)
  assert model.config.lora is None  # merged for deployment
  p = variables["params"]
  # untouched by LoRA: embeddings, norms, MLP, k/o projections
  for path in (("embed",), ("layers", "mlp", "up_proj", "kernel"), ("layers", "attn", "k_proj", "kernel")):
    a, b = p, bb.params
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # q / v changed by the merged adapters, and the score head trained away from the backbone's
  assert not np.array_equal(np.asarray(p["layers"]["attn"]["q_proj"]["kernel"]),
                            np.asarray(bb.params["layers"]["attn"]["q_proj"]["kernel"]))
  assert not np.allclose(np.asarray(p["score"]["kernel"]), np.asarray(bb.params["score"]["kernel"]))
  # the LoRA RM run as a backbone source (checkpoint:DIR): merged weights with its trained head
  as_backbone = load_source(f"checkpoint:{tmp_path / 'lora'}")
  assert as_backbone.config.lora is None
  for a, b in zip(jax.tree.leaves(as_backbone.params), jax.tree.leaves(p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert jax.tree.structure(as_backbone.params) == jax.tree.structure(p)
  loaded = rm.load_reward_model(str(tmp_path / "lora"))
  ex = data["eval"][:8]
  direct = RewardModelScorer(model, variables, tok, cfg.objectives, max_prompt_len=16, max_len=64)
  np.testing.assert_array_equal(loaded.score([e["prompt"] for e in ex], [e["chosen"] for e in ex]),
                                direct.score([e["prompt"] for e in ex], [e["chosen"] for e in ex]))


# ---------------------------------------------------------------------------------------------- errors / data


def test_train_reward_model_errors(task, tmp_path):
  cfg, data, tok, _ = task
  with pytest.raises(ValueError, match="needs model_config"):
    rm.train_reward_model(_cfg(2), str(tmp_path / "a"), data["train"], tok, backbone_source="scratch",
                          objectives=cfg.objectives, max_prompt_len=16, max_response_len=48)
  with pytest.raises(ValueError, match=r"pair_objectives have 3 entries, objectives are \['a', 'b'\]"):
    rm.train_reward_model(_cfg(2), str(tmp_path / "b"), data["train"], tok, backbone_source="scratch",
                          objectives=["a", "b"], model_config=_tiny(tok), max_prompt_len=16, max_response_len=48)
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
    rm.train_reward_model(_cfg(2), str(tmp_path / "c"), data["train"], tok, backbone_source="scratch",
                          objectives=cfg.objectives, model_config=_tiny(tok), max_prompt_len=32, max_response_len=48)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_fit_responses_cuts_only_over_long_responses_to_prefixes(task):
  _, data, tok, _ = task
  from pro_jax.data.tokenize import encode, normalize_messages
  ex = [dict(data["train"][i]) for i in range(30)]
  ex[3]["chosen"] = " ".join(["the zorb is blue ."] * 20)  # 100 words
  ex[7]["rejected"] = " ".join(["it eats fish ."] * 30)
  out, n_cut = rm.fit_responses(ex, tok, 60)  # the task's own responses are <= 48 tokens with EOS
  assert n_cut == 2
  for i, (a, b) in enumerate(zip(ex, out)):
    for f in ("chosen", "rejected"):
      _, r = encode(tok, [normalize_messages(b["prompt"])], [b[f]], "auto")
      assert len(r[0]) <= 60
      if (i, f) in ((3, "chosen"), (7, "rejected")):
        assert a[f].startswith(b[f]) and len(b[f]) < len(a[f])
        assert len(r[0]) >= 56, "cut much shorter than needed"
      else:
        assert b[f] == a[f]


def test_tokenizer_saved_with_the_run_is_guarded(task, tmp_path):
  _, _, tok, _ = task
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  from pro_jax.models.tokenizer import load_tokenizer
  other = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4}, unk_token="<unk>"))
  other.pre_tokenizer = pre_tokenizers.Whitespace()
  other = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
  path = rm._save_tokenizer(tok, str(tmp_path))
  assert path == str(tmp_path / "tokenizer")
  probe = "what color is the zorb ?"
  assert load_tokenizer(path)(probe)["input_ids"] == tok(probe)["input_ids"]
  assert rm._save_tokenizer(tok, str(tmp_path)) == path  # the same tokenizer again: fine
  with pytest.raises(ValueError, match="holds another tokenizer"):
    rm._save_tokenizer(other, str(tmp_path))
  assert len(load_tokenizer(path)) == len(tok)  # untouched
  rm._save_tokenizer(other, str(tmp_path), replace=True)  # existing="overwrite"
  assert len(load_tokenizer(path)) == 5 and not (tmp_path / "tokenizer.tmp").exists()
