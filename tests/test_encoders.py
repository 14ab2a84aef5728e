"""DistilBERT / BART sequence classifiers (pro_jax.models.encoders) and their scorer, against PyTorch
`transformers` golden outputs.

The fixtures (tests/golden/fixtures/{distilbert,bart}_*) were written by
tests/golden/make_golden_encoders.py (torch 2.13 + transformers 5.24, in a separate venv): tiny random
models, tiny trained tokenizers, fp32 scores of padded token batches and of the paper's (RiC's)
tokenizer calls. Nothing here needs torch.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from pro_jax.models.encoder_scorer import EncoderClassifierScorer, encoder_reward_scorer, tldr_post
from pro_jax.models.encoders import EncoderClassifier, hf_config_to_encoder_config, load_encoder_classifier
from pro_jax.models.hf_io import CheckpointError, load_hf_model
from pro_jax.models.tokenizer import load_tokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "golden" / "fixtures"
NAMES = ["distilbert_cls2_tok", "distilbert_cls3_relu", "bart_cls2_tok", "bart_cls3_scaled"]
TOL = 1e-4
_CACHE: dict[str, tuple] = {}


def _load(name: str):
  if name not in _CACHE:
    model, params = load_encoder_classifier(FIXTURES / name)
    fn = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m).scores)
    _CACHE[name] = (model, params, fn)
  return _CACHE[name]


def _golden(name: str):
  return np.load(FIXTURES / name / "golden.npz")


def _errors(name: str) -> dict:
  _, params, fn = _load(name)
  g = _golden(name)
  out = dict(err=float(np.abs(np.asarray(fn(params, g["tokens"], g["mask"])) - g["scores"]).max()),
             ref=float(np.abs(g["scores"]).max()), text_err=None)
  if "text_tokens" in g:
    ours = np.asarray(fn(params, g["text_tokens"], g["text_mask"]))
    out["text_err"] = float(np.abs(ours - g["text_scores"]).max())
  return out


def _copy(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


def _tensors(d: pathlib.Path) -> dict[str, np.ndarray]:
  with safe_open(str(d / "model.safetensors"), framework="np") as h:
    return {k: h.get_tensor(k) for k in h.keys()}


def _rewrite(d: pathlib.Path, fn) -> None:
  tensors = fn(_tensors(d))
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _rewrite_config(d: pathlib.Path, fn) -> None:
  cfg = json.loads((d / "config.json").read_text())
  fn(cfg)
  (d / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_parity_fp32(name):
  """Scores of full, right-padded and left-padded rows (and of the tokenizer's own batches) match
  transformers' within 1e-4."""
  r = _errors(name)
  assert r["err"] <= TOL, f"{name}: max |diff| {r['err']:.3e} > {TOL} (max |ref| {r['ref']:.2f})"
  assert r["ref"] > 0.5, "golden scores are too small to test anything"
  if r["text_err"] is not None:
    assert r["text_err"] <= TOL, f"{name}: tokenizer batch max |diff| {r['text_err']:.3e}"


def test_parity_table(capsys):
  """Prints max |ours - transformers| per fixture (fp32 scores)."""
  lines = [f"{'fixture':22s} {'architecture':36s} {'max|diff|':>10s} {'text batch':>10s} {'max|ref|':>9s}"]
  worst = 0.0
  for n in NAMES:
    r = _errors(n)
    arch = json.loads((FIXTURES / n / "config.json").read_text())["architectures"][0]
    text = f"{r['text_err']:.2e}" if r["text_err"] is not None else "-"
    lines.append(f"{n:22s} {arch:36s} {r['err']:10.2e} {text:>10s} {r['ref']:9.3f}")
    worst = max(worst, r["err"], r["text_err"] or 0.0)
  with capsys.disabled():
    print("\nencoder parity vs transformers 5.24 / torch 2.13 (fp32):\n" + "\n".join(lines))
  assert worst <= TOL, "\n".join(lines)


def test_config_mapping():
  """Hand-checked fields of the fixtures' config.json files."""
  c = _load("distilbert_cls2_tok")[0].config
  assert (c.arch, c.d_model, c.n_layers, c.n_heads, c.mlp_dim, c.max_seq_len, c.activation, c.norm_eps) == (
      "distilbert", 32, 2, 4, 64, 64, "gelu", 1e-12)
  assert (c.num_labels, c.labels, c.pad_token_id, c.head) == (2, ("NO_HUMOR", "HUMOR"), 0, "score")
  assert c.label_index("humor") == 1 and c.label_index(0) == 0
  c = _load("distilbert_cls3_relu")[0].config
  assert (c.d_model, c.n_layers, c.n_heads, c.mlp_dim, c.activation, c.num_labels) == (24, 3, 2, 40, "relu", 3)
  c = _load("bart_cls3_scaled")[0].config
  assert (c.arch, c.d_model, c.n_layers, c.decoder_layers, c.n_heads, c.decoder_heads) == ("bart", 24, 1, 2, 2, 3)
  assert (c.mlp_dim, c.decoder_mlp_dim, c.scale_embedding, c.norm_eps, c.max_seq_len) == (40, 56, True, 1e-5, 32)
  assert (c.eos_token_id, c.decoder_start_token_id, c.pad_token_id, c.num_labels) == (2, 2, 1, 3)
  c = _load("bart_cls2_tok")[0].config
  assert (c.scale_embedding, c.labels, c.vocab_size) == (False, ("Hallucinated", "Faithful"), 301)


def test_load_hf_model_dispatches_encoders():
  """`load_hf_model` returns the encoder classifier for DistilBERT / BART directories, with the
  same parameters, and refuses the decoder-only options."""
  for name in ("distilbert_cls2_tok", "bart_cls3_scaled"):
    model, params = load_hf_model(FIXTURES / name)
    assert isinstance(model, EncoderClassifier)
    _, ref_params, _ = _load(name)
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
  for kw in (dict(head="lm"), dict(value_head=True), dict(remat="full"), dict(num_labels=1)):
    with pytest.raises(CheckpointError, match="config.json"):
      load_hf_model(FIXTURES / "bart_cls2_tok", **kw)
  with pytest.raises(CheckpointError, match="max_position_embeddings"):
    load_hf_model(FIXTURES / "distilbert_cls2_tok", max_seq_len=65)


def test_bfloat16_compute_is_close():
  """dtype=bfloat16 (compute and parameters) stays near the fp32 reference (not a parity claim)."""
  g = _golden("bart_cls2_tok")
  model, params = load_encoder_classifier(FIXTURES / "bart_cls2_tok", dtype="bfloat16", param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  scores = np.asarray(jax.jit(lambda p, t, m: model.apply({"params": p}, t, m).scores)(params, g["tokens"], g["mask"]))
  assert scores.dtype == np.float32
  assert np.abs(scores - g["scores"]).max() < 0.15


def test_too_long_input_is_refused():
  model, params, _ = _load("distilbert_cls3_relu")
  with pytest.raises(ValueError, match="learned"):
    model.apply({"params": params}, np.ones((1, 33), np.int32))


# ------------------------------------------------------------------------------------------- loading


def test_sharded_checkpoint_loads_identically(tmp_path):
  d = _copy("bart_cls2_tok", tmp_path)
  tensors = _tensors(d)
  (d / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
  weight_map = {}
  for fname, part in shards.items():
    save_file({k: tensors[k] for k in part}, str(d / fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in part})
  (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, params = load_encoder_classifier(d)
  _, ref, _ = _load("bart_cls2_tok")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))


def test_old_bart_tensor_layout_loads(tmp_path):
  """Checkpoints written by older transformers also hold the encoder / decoder copies of the shared
  embedding; they are ignored, as transformers ties them to model.shared."""
  d = _copy("bart_cls3_scaled", tmp_path)
  _rewrite(d, lambda t: {**t, "model.encoder.embed_tokens.weight": t["model.shared.weight"],
                         "model.decoder.embed_tokens.weight": t["model.shared.weight"]})
  _, params = load_encoder_classifier(d)
  _, ref, _ = _load("bart_cls3_scaled")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))


def test_legacy_layernorm_names_load(tmp_path):
  """Old BERT-family files name LayerNorm parameters gamma / beta; transformers renames them on
  load, and so does pro_jax."""
  d = _copy("distilbert_cls3_relu", tmp_path)
  _rewrite(d, lambda t: {(k[:-len("weight")] + "gamma" if "norm" in k.lower() and k.endswith("weight") else
                          k[:-len("bias")] + "beta" if "norm" in k.lower() and k.endswith("bias") else k): v
                         for k, v in t.items()})
  assert "distilbert.embeddings.LayerNorm.gamma" in _tensors(d)
  _, params = load_encoder_classifier(d)
  _, ref, _ = _load("distilbert_cls3_relu")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))


@pytest.mark.parametrize("axes", [("data", "model"), ("fsdp",)])
def test_mesh_placement_replicates_on_any_axis_names(axes):
  devices = np.array(jax.devices()[:2] if len(axes) == 2 else jax.devices()[:4]).reshape(
      (1, 2) if len(axes) == 2 else (4,))
  mesh = Mesh(devices, axes)
  model, params = load_encoder_classifier(FIXTURES / "distilbert_cls2_tok", mesh=mesh)
  for x in jax.tree.leaves(params):
    assert isinstance(x.sharding, NamedSharding) and x.sharding.spec == P() and x.sharding.mesh == mesh
  g = _golden("distilbert_cls2_tok")
  scores = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m).scores)(params, g["tokens"], g["mask"])
  assert np.abs(np.asarray(scores) - g["scores"]).max() <= TOL


def test_checkpoint_errors(tmp_path):
  """Bad checkpoints fail with a CheckpointError naming the file and the tensor or field."""
  d = _copy("distilbert_cls3_relu", tmp_path)
  name = "distilbert.transformer.layer.1.ffn.lin1.weight"
  _rewrite(d, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(CheckpointError, match=r"missing tensor distilbert\.transformer\.layer\.1\.ffn\.lin1\.weight "
                                            r"\(expected shape \[40, 24\]\)"):
    load_encoder_classifier(d)

  d = _copy("bart_cls3_scaled", tmp_path / "shape")
  _rewrite(d, lambda t: {**t, "classification_head.out_proj.bias": np.zeros(2, np.float32)})
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor classification_head\.out_proj\.bias has "
                                            r"shape \[2\], expected \[3\]"):
    load_encoder_classifier(d)

  d = _copy("bart_cls3_scaled", tmp_path / "extra")
  _rewrite(d, lambda t: {**t, "model.encoder.layers.1.fc1.weight": np.zeros((40, 24), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected tensor model\.encoder\.layers\.1\.fc1\.weight"):
    load_encoder_classifier(d)

  d = _copy("distilbert_cls3_relu", tmp_path / "int")
  _rewrite(d, lambda t: {**t, "classifier.bias": np.zeros(3, np.int8)})
  with pytest.raises(CheckpointError, match=r"classifier\.bias has dtype I8"):
    load_encoder_classifier(d)

  d = _copy("bart_cls3_scaled", tmp_path / "gen")
  _rewrite_config(d, lambda c: c.update(architectures=["BartForConditionalGeneration"]))
  with pytest.raises(CheckpointError, match=r"config\.json: architectures \['BartForConditionalGeneration'\]"):
    load_hf_model(d)

  d = _copy("distilbert_cls3_relu", tmp_path / "act")
  _rewrite_config(d, lambda c: c.update(activation="quick_gelu"))
  with pytest.raises(CheckpointError, match=r"config\.json: activation 'quick_gelu' is not supported"):
    load_encoder_classifier(d)

  with pytest.raises(CheckpointError, match="normalize_before"):
    hf = json.loads((FIXTURES / "bart_cls3_scaled" / "config.json").read_text())
    hf_config_to_encoder_config({**hf, "normalize_before": True})


# -------------------------------------------------------------------------------------------- scorer


def _texts(name: str) -> dict:
  return json.loads((FIXTURES / name / "texts.json").read_text())


@pytest.mark.parametrize("name,preset", [("distilbert_cls2_tok", "humor"), ("bart_cls2_tok", "faithfulness")])
def test_paper_scorer_matches_transformers(name, preset):
  """The preset scorer feeds the model what RiC's tokenizer call gives transformers (same ids, mask
  within the bucket padding) and returns torch's logit of label 1."""
  t, g = _texts(name), _golden(name)
  scorer = encoder_reward_scorer(FIXTURES / name, preset, preset=preset, max_len=t["max_length"], batch_size=3)
  tokens, mask = scorer.tokenize(t["prompts"], t["responses"])
  L = g["text_tokens"].shape[1]
  assert tokens.shape[1] % 64 == 0 or tokens.shape[1] == t["max_length"]
  np.testing.assert_array_equal(tokens[:, :L], g["text_tokens"])
  np.testing.assert_array_equal(mask[:, :L], g["text_mask"])
  assert mask[:, L:].sum() == 0
  scores = scorer.score(t["prompts"], t["responses"])
  assert scores.shape == (len(t["responses"]), 1) and scores.dtype == np.float32
  np.testing.assert_allclose(scores[:, 0], g["text_scores"][:, 1], atol=TOL, rtol=0)


@pytest.mark.slow
def test_scorer_outputs_labels_and_prompt_forms():
  """prob / log_prob are torch's softmax / log-softmax at the label; a label by name picks its
  column; schema prompts (lists of turns) score like plain strings; rows scored one at a time (as
  RiC does, unpadded) equal the batched, padded scores."""
  name = "bart_cls2_tok"
  t, g = _texts(name), _golden(name)
  ref = g["text_scores"].astype(np.float64)
  probs = np.exp(ref - ref.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  model, params = load_encoder_classifier(FIXTURES / name)
  tok = load_tokenizer(FIXTURES / name)

  def make(**kw):
    kw.setdefault("batch_size", 4)
    return EncoderClassifierScorer(model, params, tok, "faithfulness", text="response_prompt", prompt_text="tldr_post",
                                   max_len=t["max_length"], **kw)

  np.testing.assert_allclose(make(output="prob").score(t["prompts"], t["responses"])[:, 0], probs[:, 1], atol=1e-5)
  np.testing.assert_allclose(make(output="log_prob", label="hallucinated").score(t["prompts"], t["responses"])[:, 0],
                             np.log(probs[:, 0]), atol=1e-4)
  schema = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}] for p in t["prompts"]]
  batched = make().score(schema, t["responses"])
  np.testing.assert_allclose(batched[:, 0], g["text_scores"][:, 1], atol=TOL)
  one = make(batch_size=1)
  singles = [one.score([p], [r])[0, 0] for p, r in zip(t["prompts"], t["responses"])]
  np.testing.assert_allclose(singles, batched[:, 0], atol=TOL)
  assert make().score([], []).shape == (0, 1)
  with pytest.raises(ValueError, match="not one of the model's labels"):
    make(label="funny")
  with pytest.raises(ValueError, match="2 prompts and 1 responses"):
    make().score(["a", "b"], ["c"])


def test_scorer_key_tells_weights_apart(tmp_path):
  """The cache key changes with the weights and the settings, not between two loads of one model."""
  d = _copy("distilbert_cls2_tok", tmp_path)
  _rewrite(d, lambda t: {**t, "classifier.bias": t["classifier.bias"] + 1.0})
  a = encoder_reward_scorer(FIXTURES / "distilbert_cls2_tok", "humor", preset="humor", name="h")
  b = encoder_reward_scorer(FIXTURES / "distilbert_cls2_tok", "humor", preset="humor", name="h")
  c = encoder_reward_scorer(d, "humor", preset="humor", name="h")
  e = encoder_reward_scorer(FIXTURES / "distilbert_cls2_tok", "humor", preset="humor", name="h", output="prob")
  assert a.key == b.key and a.key != c.key and a.key != e.key


def test_tldr_post():
  q = "SUBREDDIT: r/tifu\n\nTITLE: locked out\n\nPOST: I locked myself out.\nThen the oven.\n\nTL;DR:"
  assert tldr_post(q) == "I locked myself out.\nThen the oven."
  assert tldr_post([{"role": "user", "content": "Article:\nSome news.\n\nTL;DR:"}]) == "Article:\nSome news."
  assert tldr_post("no format here") == "no format here"


def test_scorer_stacks_and_caches(tmp_path):
  """The encoder scorer combines with the other scorers: StackedScorer columns in order, and a
  CachedScorer answers the second call from its file with the same values."""
  from pro_jax.stages.scoring import CachedScorer, StackedScorer
  t, g = _texts("distilbert_cls2_tok"), _golden("distilbert_cls2_tok")
  humor = encoder_reward_scorer(FIXTURES / "distilbert_cls2_tok", "humor", preset="humor", max_len=t["max_length"],
                                batch_size=4)
  no_humor = encoder_reward_scorer(FIXTURES / "distilbert_cls2_tok", "no_humor", label="NO_HUMOR",
                                   max_len=t["max_length"], batch_size=4)
  cached = CachedScorer(StackedScorer([humor, no_humor]), tmp_path / "scores.sqlite")
  first = cached.score(t["prompts"], t["responses"])
  np.testing.assert_allclose(first, g["text_scores"][:, ::-1], atol=TOL)
  again = CachedScorer(StackedScorer([humor, no_humor]), tmp_path / "scores.sqlite")
  np.testing.assert_array_equal(again.score(t["prompts"], t["responses"]), first)
  assert (again.hits, again.misses) == (len(t["responses"]), 0)


def test_stage_scorers_dispatch_encoder_directories():
  """A `scorers` entry `hf:DIR=humor` on a DistilBERT directory scores as RiC's humor call (torch's
  label-1 logit); `hf:DIR=faithfulness` on a BART one as RiC's faithfulness call; a decoder
  classifier still goes through the decoder reward-model scorer."""
  from pro_jax.stages.context import imported_scorer
  from pro_jax.models.tokenizer import TokenizerError
  for name, objective in (("distilbert_cls2_tok", "humor"), ("bart_cls2_tok", "faithfulness")):
    t, g = _texts(name), _golden(name)
    scorer = imported_scorer(str(FIXTURES / name), objective)
    assert isinstance(scorer, EncoderClassifierScorer) and list(scorer.objectives) == [objective]
    np.testing.assert_allclose(scorer.score(t["prompts"], t["responses"])[:, 0], g["text_scores"][:, 1], atol=TOL)
  # a decoder classifier goes the decoder way: its model loads, then its tokenizer is looked up (this
  # fixture ships none; the encoder loader would have refused the GPT-2 checkpoint itself)
  with pytest.raises(TokenizerError, match="no tokenizer files"):
    imported_scorer(str(FIXTURES / "gpt2_cls1"), "helpful")
