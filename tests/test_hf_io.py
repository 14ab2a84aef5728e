"""Import / export of transformers checkpoints, against PyTorch `transformers` golden outputs.

The fixtures in tests/golden/fixtures/ were written by tests/golden/make_golden.py (torch 2.13 +
transformers 5.24, in a separate venv): tiny random models saved with `save_pretrained` and their
fp32 logits / scores for fixed, padded inputs. Nothing here needs torch.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from pro_jax import sharding as sh
from pro_jax.models import hf_io, safetensors_io
from pro_jax.models.config import LoRAConfig, ModelConfig, RopeScaling
from pro_jax.models.hf_io import CheckpointError, load_hf_model, save_hf_model
from pro_jax.models.transformer import Transformer, abstract_variables, logical_axes, rope_inv_freq

FIXTURES = pathlib.Path(__file__).resolve().parent / "golden" / "fixtures"
NAMES = ["llama_gqa_untied", "llama_tied_sharded", "llama_rope_llama3", "llama_rope_linear_bias", "qwen2_gqa_tied",
         "mistral_swa_bf16", "gpt2_lm", "gpt2_cls1", "gpt2_cls3", "llama_cls2", "qwen2_cls1",
         "qwen3_gqa_untied", "qwen3_tied", "qwen3_cls2", "gemma2_swa_softcap", "gemma2_cls1", "gemma3_pattern_untied",
         "gemma3_cls3"]
TOL = 1e-4
_CACHE: dict[str, dict] = {}


def _golden(name: str):
  return np.load(FIXTURES / name / "golden.npz")


def _apply(model, params, tokens, mask):
  """Jitted forward (much faster than op-by-op on CPU)."""
  return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))(params, jnp.asarray(tokens), jnp.asarray(mask))


def _outputs(model, params, g) -> np.ndarray:
  out = _apply(model, params, g["tokens"], g["mask"])
  return np.asarray(out.logits if model.config.head == "lm" else out.scores)


def _max_err(model, params, g) -> float:
  ours = _outputs(model, params, g)
  if "logits" in g:  # only the non-pad positions
    return float(np.abs(ours - g["logits"])[g["mask"].astype(bool)].max())
  return float(np.abs(ours - g["scores"]).max())


def _parity(name: str) -> dict:
  if name not in _CACHE:
    model, params = load_hf_model(FIXTURES / name)
    g = _golden(name)
    ref = g["logits"][g["mask"].astype(bool)] if "logits" in g else g["scores"]
    arch = json.loads((FIXTURES / name / "config.json").read_text())["architectures"][0]
    inv = float(np.abs(rope_inv_freq(model.config) - g["inv_freq"]).max()) if "inv_freq" in g else None
    if "inv_freq_local" in g:  # Gemma 3: the sliding layers' own RoPE
      inv = max(inv, float(np.abs(rope_inv_freq(model.config, local=True) - g["inv_freq_local"]).max()))
    _CACHE[name] = dict(arch=arch, err=_max_err(model, params, g), ref=float(np.abs(ref).max()), inv_freq=inv)
  return _CACHE[name]


def _load_files(d: pathlib.Path) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(d.glob("*.safetensors")):
    with safe_open(str(f), framework="np") as h:
      out.update({k: h.get_tensor(k) for k in h.keys()})
  return out


def _copy_fixture(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


def _rewrite_config(d: pathlib.Path, fn) -> None:
  cfg = json.loads((d / "config.json").read_text())
  fn(cfg)
  (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d: pathlib.Path, fn) -> None:
  tensors = _load_files(d)
  tensors = fn(tensors)
  for f in d.glob("*.safetensors"):
    f.unlink()
  (d / "model.safetensors.index.json").unlink(missing_ok=True)
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _tree_equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_parity_fp32(name):
  r = _parity(name)
  assert r["err"] <= TOL, f"{name} ({r['arch']}): max |diff| {r['err']:.3e} > {TOL} (max |ref| {r['ref']:.2f})"
  assert r["ref"] > 0.5, "golden outputs are too small to test anything"
  if r["inv_freq"] is not None:
    assert r["inv_freq"] <= 1e-6, f"{name}: RoPE inverse frequencies differ from HF's by {r['inv_freq']:.2e}"


def test_parity_table(capsys):
  """Prints max |ours - transformers| per fixture (fp32, non-pad positions / scores)."""
  rows = [(n, _parity(n)) for n in NAMES]
  lines = [f"{'fixture':24s} {'architecture':36s} {'max|diff|':>10s} {'max|ref|':>9s} {'inv_freq':>9s}"]
  for n, r in rows:
    inv = f"{r['inv_freq']:.1e}" if r["inv_freq"] is not None else "-"
    lines.append(f"{n:24s} {r['arch']:36s} {r['err']:10.2e} {r['ref']:9.3f} {inv:>9s}")
  with capsys.disabled():
    print("\nparity vs transformers 5.24 / torch 2.13 (fp32):\n" + "\n".join(lines))
  assert all(r["err"] <= TOL for _, r in rows), "\n".join(lines)


def test_config_mapping():
  """Hand-checked fields of the fixtures' config.json files."""
  m, _ = load_hf_model(FIXTURES / "llama_gqa_untied")
  c = m.config
  assert (c.arch, c.d_model, c.n_heads, c.kv_heads, c.hd, c.mlp_dim, c.tie_embeddings) == (
      "llama", 32, 4, 2, 16, 64, False)
  assert (c.head, c.norm_eps, c.max_seq_len, c.rope_theta) == ("lm", 1e-5, 64, 10000.0)
  c = load_hf_model(FIXTURES / "llama_rope_llama3")[0].config
  assert c.rope_theta == 500.0 and c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 128)
  c = load_hf_model(FIXTURES / "llama_rope_linear_bias")[0].config
  assert (c.rope_scaling, c.qkv_bias, c.o_bias, c.mlp_bias) == (RopeScaling("linear", 4.0), True, True, True)
  c = load_hf_model(FIXTURES / "qwen2_gqa_tied")[0].config
  assert (c.qkv_bias, c.o_bias, c.tie_embeddings, c.kv_heads, c.norm_eps, c.sliding_window) == (
      True, False, True, 1, 1e-6, None)
  c = load_hf_model(FIXTURES / "mistral_swa_bf16")[0].config
  assert (c.sliding_window, c.qkv_bias, c.param_dtype) == (4, False, "float32")
  c = load_hf_model(FIXTURES / "gpt2_lm")[0].config
  assert (c.arch, c.mlp_dim, c.max_seq_len, c.tie_embeddings, c.bos_token_id, c.eos_token_id) == (
      "gpt2", 128, 32, True, 1, 2)
  c = load_hf_model(FIXTURES / "gpt2_cls3")[0].config
  assert (c.head, c.num_labels, c.mlp_dim, c.norm_eps, c.pad_token_id) == ("score", 3, 48, 1e-6, 0)
  c = load_hf_model(FIXTURES / "llama_cls2")[0].config
  assert (c.head, c.num_labels, c.pad_token_id) == ("score", 2, 0)


def test_config_mapping_qwen3_gemma():
  """Hand-checked fields of the Qwen3 / Gemma 2 / Gemma 3 fixtures' config.json files."""
  c = load_hf_model(FIXTURES / "qwen3_gqa_untied")[0].config
  assert (c.qk_norm, c.hd, c.n_heads, c.kv_heads, c.qkv_bias, c.o_bias, c.tie_embeddings, c.norm_offset) == (
      True, 16, 4, 2, False, False, False, 0.0)
  assert (c.sandwich_norms, c.scale_embeddings, c.mlp_act, c.sliding_window, c.layer_types) == (
      False, False, "silu", None, None)
  c = load_hf_model(FIXTURES / "qwen3_tied")[0].config
  assert (c.tie_embeddings, c.hd, c.norm_eps, c.rope_theta) == (True, 8, 1e-5, 1000.0)
  c = load_hf_model(FIXTURES / "gemma2_swa_softcap")[0].config
  assert (c.norm_offset, c.scale_embeddings, c.mlp_act, c.sandwich_norms, c.qk_norm, c.tie_embeddings) == (
      1.0, True, "gelu_tanh", True, False, True)
  assert (c.query_pre_attn_scalar, c.attn_logit_softcap, c.final_logit_softcap, c.sliding_window) == (
      24.0, 3.0, 8.0, 4)
  assert c.layer_types == ("sliding_attention", "full_attention") and c.sliding_layers == (True, False)
  assert (c.local_rope_theta, c.pad_token_id, c.bos_token_id, c.eos_token_id) == (None, 0, 2, 1)
  c = load_hf_model(FIXTURES / "gemma3_pattern_untied")[0].config
  assert c.sliding_layers == (True,) * 5 + (False,) and c.mixed_layers
  assert (c.qk_norm, c.sandwich_norms, c.attn_logit_softcap, c.final_logit_softcap, c.tie_embeddings) == (
      True, True, None, None, False)
  assert (c.rope_theta, c.rope_scaling, c.local_rope_theta, c.query_pre_attn_scalar) == (
      1e6, RopeScaling("linear", 8.0), 1e4, 16.0)
  c = load_hf_model(FIXTURES / "gemma3_cls3")[0].config
  assert (c.head, c.num_labels, c.sliding_window, c.rope_theta, c.local_rope_theta) == ("score", 3, 3, 1e5, 1e3)


def test_gemma_configs_without_layer_types(tmp_path):
  """Hub configs written by transformers 4: Gemma 2 without layer_types (every other layer sliding,
  from the first); Gemma 3 with sliding_window_pattern and v4 rope_theta / rope_scaling /
  rope_local_base_freq. They map to the same model as the v5 files."""
  d = _copy_fixture("gemma2_swa_softcap", tmp_path)
  _rewrite_config(d, lambda c: c.pop("layer_types"))
  assert load_hf_model(d)[0].config == load_hf_model(FIXTURES / "gemma2_swa_softcap")[0].config
  d = _copy_fixture("gemma3_pattern_untied", tmp_path)

  def to_v4(cfg):
    cfg.pop("layer_types")
    cfg.pop("rope_parameters")
    cfg.update(sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0})

  _rewrite_config(d, to_v4)
  model, params = load_hf_model(d)
  assert model.config == load_hf_model(FIXTURES / "gemma3_pattern_untied")[0].config
  assert _max_err(model, params, _golden("gemma3_pattern_untied")) <= TOL


def test_mixed_layers_under_a_real_scan(monkeypatch):
  """Gemma 3's 5:1 local / global layers and Gemma 2's alternation under nn.scan (unroll=1): the
  per-layer window and RoPE are scanned inputs, so the scanned model matches transformers too."""
  from pro_jax.models import transformer
  monkeypatch.setattr(transformer, "UNROLL_MAX_LAYERS", 0)
  for name in ("gemma3_pattern_untied", "gemma2_swa_softcap"):
    model, params = load_hf_model(FIXTURES / name)
    assert transformer.scans_layers(model.config)
    err = _max_err(model, params, _golden(name))
    assert err <= TOL, f"{name} scanned: max |diff| {err:.2e}"


def test_legacy_rope_config(tmp_path):
  """transformers 4 style `rope_theta` + `rope_scaling` (incl. the old "type" key) map the same way."""
  for name, legacy in [("llama_rope_llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
                       ("llama_rope_linear_bias", {"type": "linear", "factor": 4.0})]:
    d = _copy_fixture(name, tmp_path)

    def to_legacy(cfg, legacy=legacy):
      theta = cfg.pop("rope_parameters")["rope_theta"]
      cfg.update(rope_theta=theta, rope_scaling=legacy)

    _rewrite_config(d, to_legacy)
    assert load_hf_model(d)[0].config == load_hf_model(FIXTURES / name)[0].config


def test_gpt2_unprefixed_checkpoint_with_buffers(tmp_path):
  """Original GPT-2 checkpoints: no `transformer.` prefix, plus attn.bias / attn.masked_bias buffers."""
  d = _copy_fixture("gpt2_lm", tmp_path)

  def strip(tensors):
    out = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
      out[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
      out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    return out

  _rewrite_tensors(d, strip)
  assert "h.0.attn.c_attn.weight" in _load_files(d)
  _, ref = load_hf_model(FIXTURES / "gpt2_lm")
  _, params = load_hf_model(d)
  assert _tree_equal(params, ref)


def test_llama_checkpoint_without_model_prefix(tmp_path):
  d = _copy_fixture("llama_gqa_untied", tmp_path)
  _rewrite_tensors(d, lambda t: {k.removeprefix("model."): v for k, v in t.items()})
  assert "layers.0.self_attn.q_proj.weight" in _load_files(d)
  assert _tree_equal(load_hf_model(d)[1], load_hf_model(FIXTURES / "llama_gqa_untied")[1])


def test_gpt2_max_seq_len_cuts_wpe():
  _, ref = load_hf_model(FIXTURES / "gpt2_lm")
  model, params = load_hf_model(FIXTURES / "gpt2_lm", max_seq_len=16)
  assert params["wpe"].shape == (16, 32)
  np.testing.assert_array_equal(np.asarray(params["wpe"]), np.asarray(ref["wpe"])[:16])
  with pytest.raises(CheckpointError, match="n_positions=32"):
    load_hf_model(FIXTURES / "gpt2_lm", max_seq_len=64)


def test_bf16_compute_and_params():
  g = _golden("llama_gqa_untied")
  ref_max = float(np.abs(g["logits"][g["mask"].astype(bool)]).max())
  model, params = load_hf_model(FIXTURES / "llama_gqa_untied", dtype="bfloat16")
  assert params["embed"].dtype == jnp.float32
  err = _max_err(model, params, g)
  assert err <= 0.05 * ref_max, f"bf16 compute: max |diff| {err:.3f} vs max |logit| {ref_max:.2f}"
  model, params = load_hf_model(FIXTURES / "llama_gqa_untied", dtype="bfloat16", param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  err = _max_err(model, params, g)
  assert err <= 0.05 * ref_max, f"bf16 params: max |diff| {err:.3f} vs max |logit| {ref_max:.2f}"


def test_bf16_checkpoint_converts_exactly():
  """BF16 tensors in the file -> float32 params holding exactly the bf16 values (transposed)."""
  _, params = load_hf_model(FIXTURES / "mistral_swa_bf16")
  with safe_open(str(FIXTURES / "mistral_swa_bf16" / "model.safetensors"), framework="np") as f:
    w = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
  assert w.dtype == jnp.bfloat16 and w.shape == (16, 32)
  got = np.asarray(params["layers"]["attn"]["k_proj"]["kernel"][1])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, w.astype(np.float32).T)


def test_new_score_and_value_heads():
  """A reward model initialised from a causal LM: same backbone, new score / value heads."""
  g = _golden("llama_gqa_untied")
  lm, lm_params = load_hf_model(FIXTURES / "llama_gqa_untied")
  rm, rm_params = load_hf_model(FIXTURES / "llama_gqa_untied", head="score", num_labels=2, value_head=True)
  assert "lm_head" not in rm_params and rm_params["score"]["kernel"].shape == (32, 2)
  assert 0.005 < float(np.std(np.asarray(rm_params["score"]["kernel"]))) < 0.05
  np.testing.assert_array_equal(np.asarray(rm_params["value_head"]["bias"]), 0.0)
  out_lm = _apply(lm, lm_params, g["tokens"], g["mask"])
  out_rm = _apply(rm, rm_params, g["tokens"], g["mask"])
  assert out_rm.scores.shape == (3, 2) and out_rm.values.shape == (3, 12)
  np.testing.assert_allclose(np.asarray(out_rm.hidden), np.asarray(out_lm.hidden), atol=1e-6)


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", NAMES)
def test_save_roundtrip_is_exact(name, tmp_path):
  """save_hf_model writes exactly HF's tensor names, shapes, dtypes and values; reloading is bit-identical."""
  model, params = load_hf_model(FIXTURES / name)
  dtype = "bfloat16" if name.endswith("bf16") else None
  out = save_hf_model(tmp_path / "export", model, params, dtype=dtype)
  ours, theirs = _load_files(out), _load_files(FIXTURES / name)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    assert ours[k].tobytes() == theirs[k].tobytes(), f"{name}: {k} differs"
  model2, params2 = load_hf_model(out)
  assert model2.config == model.config
  assert _tree_equal(params2, params)
  hf = json.loads((out / "config.json").read_text())
  assert hf["architectures"] == json.loads((FIXTURES / name / "config.json").read_text())["architectures"]
  assert not list(tmp_path.glob(".export*")), "temporary directory left behind"


def test_sharded_save_writes_an_index(tmp_path):
  model, params = load_hf_model(FIXTURES / "llama_gqa_untied")
  out = save_hf_model(tmp_path / "sharded", model, params, max_shard_size="30KB")
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(out.glob("model-*-of-*.safetensors"))
  assert len(shards) > 2 and not (out / "model.safetensors").exists()
  assert sorted(set(index["weight_map"].values())) == [f.name for f in shards]
  tensors = _load_files(out)
  assert sorted(index["weight_map"]) == sorted(tensors)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  for f in shards:  # every shard within the limit unless it holds a single larger tensor
    with safe_open(str(f), framework="np") as h:
      keys = list(h.keys())
      assert len(keys) == 1 or sum(h.get_tensor(k).nbytes for k in keys) <= 30_000
  assert _tree_equal(load_hf_model(out)[1], params)


def test_save_refuses_to_clobber_and_is_atomic(tmp_path):
  model, params = load_hf_model(FIXTURES / "gpt2_cls1")
  target = tmp_path / "ckpt"
  target.mkdir()
  (target / "precious.txt").write_text("keep me")
  with pytest.raises(CheckpointError, match="not empty"):
    save_hf_model(target, model, params)
  assert (target / "precious.txt").read_text() == "keep me"

  class BrokenTokenizer:
    def save_pretrained(self, d):
      raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    save_hf_model(target, model, params, tokenizer=BrokenTokenizer(), overwrite=True)
  assert sorted(p.name for p in target.iterdir()) == ["precious.txt"]
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "temporary directory left behind"
  bad = dict(params, score={"kernel": np.zeros((32, 2), np.float32)})
  with pytest.raises(CheckpointError, match=r"score/kernel has shape \[32, 2\], expected \[32, 1\]"):
    save_hf_model(tmp_path / "new", model, bad)
  assert not (tmp_path / "new").exists()
  save_hf_model(target, model, params, overwrite=True)
  assert not (target / "precious.txt").exists() and (target / "model.safetensors").is_file()


def test_save_with_tokenizer(tmp_path, shared_data):
  from pro_jax.models.tokenizer import load_tokenizer
  tok = load_tokenizer(shared_data / "models" / "stories260K" / "tok512.model")
  model, params = load_hf_model(FIXTURES / "llama_tied_sharded")
  out = save_hf_model(tmp_path / "with_tok", model, params, tokenizer=tok)
  tok2 = load_tokenizer(out)
  text = "Once upon a time, Lily saw a ball."
  assert tok2(text)["input_ids"] == tok(text)["input_ids"] and tok2(text)["input_ids"][0] == 1


def test_lora_is_merged_on_export(tmp_path):
  """Exported W + a @ b * alpha / r gives the same outputs as the adapter applied at run time."""
  g = _golden("llama_gqa_untied")
  lora_cfg = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
  model, params = load_hf_model(FIXTURES / "llama_gqa_untied", lora=lora_cfg)
  rng = np.random.default_rng(0)
  lora = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
                      abstract_variables(model)["lora"])
  args = (jnp.asarray(g["tokens"]), jnp.asarray(g["mask"]))
  fwd = jax.jit(lambda p, lo, t, m: model.apply({"params": p, "lora": lo}, t, m).logits)
  with_lora = np.asarray(fwd(params, lora, *args))
  without = np.asarray(fwd(params, jax.tree.map(np.zeros_like, lora), *args))
  mask = g["mask"].astype(bool)
  assert np.abs(with_lora - without)[mask].max() > 0.1, "LoRA delta too small to test the merge"
  out = save_hf_model(tmp_path / "merged", model, params, lora=lora)
  merged_model, merged_params = load_hf_model(out)
  assert merged_model.config.lora is None
  from pro_jax.models.lora import merge_lora
  for x, y in zip(jax.tree.leaves(merged_params), jax.tree.leaves(merge_lora(model.config, params, lora))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  merged = np.asarray(_apply(merged_model, merged_params, *args).logits)
  assert np.abs(merged - with_lora)[mask].max() <= 1e-4


def test_export_architecture_choice(tmp_path):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=48, sliding_window=8)
  assert hf_io.default_architecture(cfg) == "MistralForCausalLM"
  assert hf_io.default_architecture(cfg.replace(sliding_window=None, qkv_bias=True)) == "Qwen2ForCausalLM"
  assert hf_io.default_architecture(cfg.replace(head="score")) == "MistralForSequenceClassification"
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_variables(Transformer(cfg))["params"])
  with pytest.raises(CheckpointError, match="sliding_window"):
    save_hf_model(tmp_path / "x", cfg, params, architecture="LlamaForCausalLM")
  with pytest.raises(CheckpointError, match="head='none'"):
    save_hf_model(tmp_path / "x", cfg.replace(head="none"), params)
  base = cfg.replace(sliding_window=None)
  gemma = dict(norm_offset=1.0, scale_embeddings=True, mlp_act="gelu_tanh", sandwich_norms=True)
  assert hf_io.default_architecture(base.replace(qk_norm=True)) == "Qwen3ForCausalLM"
  assert hf_io.default_architecture(base.replace(qk_norm=True, head="score")) == "Qwen3ForSequenceClassification"
  assert hf_io.default_architecture(base.replace(**gemma)) == "Gemma2ForCausalLM"
  assert hf_io.default_architecture(base.replace(**gemma, head="score")) == "Gemma2ForSequenceClassification"
  assert hf_io.default_architecture(base.replace(**gemma, qk_norm=True)) == "Gemma3ForCausalLM"
  assert hf_io.default_architecture(base.replace(**gemma, qk_norm=True, head="score")) == (
      "Gemma3TextForSequenceClassification")
  # Options a class cannot express are refused by name, before anything is written.
  for config, arch, match in [
      (base.replace(qk_norm=True), "LlamaForCausalLM", "qk_norm=True"),
      (base.replace(**gemma), "Qwen3ForCausalLM", "norm_offset=1.0"),
      (base.replace(**gemma, qk_norm=True, attn_logit_softcap=50.0), "Gemma3ForCausalLM", "attn_logit_softcap"),
      (base.replace(**gemma, local_rope_theta=1e4), "Gemma2ForCausalLM", "local_rope_theta"),
      (base.replace(final_logit_softcap=30.0), "LlamaForCausalLM", "final_logit_softcap"),
      (cfg.replace(n_layers=2, layer_types=("sliding_attention", "full_attention"), qk_norm=True),
       "Qwen3ForCausalLM", "mixed full / sliding layers")]:
    with pytest.raises(CheckpointError, match=match):
      hf_io.model_config_to_hf_config(config, arch)
  assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def no_placement(monkeypatch):
  """Fail if load_hf_model reaches the placement of any tensor (errors must come first)."""

  def boom(*a, **k):
    raise AssertionError("a tensor was placed before the checkpoint was validated")

  monkeypatch.setattr(hf_io, "_place", boom)


def test_error_unsupported_architecture(tmp_path, no_placement):
  d = _copy_fixture("llama_gqa_untied", tmp_path)
  _rewrite_config(d, lambda c: c.update(architectures=["FalconForCausalLM"], model_type="falcon"))
  with pytest.raises(CheckpointError, match=r"config.json: unsupported architecture 'FalconForCausalLM'"):
    load_hf_model(d)


@pytest.mark.parametrize("name,change,match", [
    ("gpt2_lm", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2_lm", {"activation_function": "relu"}, "activation_function 'relu'"),
    ("llama_gqa_untied", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
    ("llama_gqa_untied", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("qwen2_gqa_tied", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None},
     "layer_types"),
    ("gemma2_swa_softcap", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2_swa_softcap", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ("gemma2_swa_softcap", {"layer_types": ["sliding_attention", "chunked_attention"]}, "chunked_attention"),
    ("gemma3_pattern_untied", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "sliding_attention rope_parameters"),
    ("gemma3_pattern_untied", {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
     "unsupported architecture 'Gemma3ForConditionalGeneration'"),
    ("qwen3_tied", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_error_unsupported_option(name, change, match, tmp_path, no_placement):
  d = _copy_fixture(name, tmp_path)
  _rewrite_config(d, lambda c: c.update(change))
  with pytest.raises(CheckpointError, match=match) as e:
    load_hf_model(d)
  assert "config.json" in str(e.value)


def test_error_missing_tensor(tmp_path, no_placement):
  d = _copy_fixture("llama_gqa_untied", tmp_path)
  _rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                            r"\(expected shape \[64, 32\]\)") as e:
    load_hf_model(d)
  assert str(d / "model.safetensors") in str(e.value)


def test_error_missing_tensor_in_sharded_checkpoint(tmp_path, no_placement):
  d = _copy_fixture("llama_tied_sharded", tmp_path)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  lost = index["weight_map"]["model.norm.weight"]
  (d / lost).unlink()
  with pytest.raises(CheckpointError, match=f"shard {lost} is listed but missing"):
    load_hf_model(d)


def test_error_wrong_shape(tmp_path, no_placement):
  d = _copy_fixture("qwen2_gqa_tied", tmp_path)
  _rewrite_tensors(d, lambda t: {**t, "model.layers.0.self_attn.k_proj.bias": np.zeros(16, np.float32)})
  with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.bias has shape \[16\], "
                                            r"expected \[8\]") as e:
    load_hf_model(d)
  assert "model.safetensors" in str(e.value)


def test_error_unexpected_tensor(tmp_path, no_placement):
  d = _copy_fixture("gpt2_cls1", tmp_path)
  _rewrite_tensors(d, lambda t: {**t, "transformer.h.1.attn.q_attn.weight": np.zeros((32, 32), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected tensor transformer\.h\.1\.attn\.q_attn\.weight"):
    load_hf_model(d)


def test_error_score_width_mismatch(no_placement):
  with pytest.raises(CheckpointError, match=r"score\.weight has shape \[3, 32\], expected \[2, 32\]"):
    load_hf_model(FIXTURES / "gpt2_cls3", num_labels=2)


# ---------------------------------------------------------------------------------------------- placement


def test_mesh_placement_reads_shards(monkeypatch):
  """On an fsdp=4 x tensor=2 mesh every parameter gets its param_shardings sharding, each callback
  reads only its shard's slice (each element read once), and the logits match the unsharded model."""
  assert jax.device_count() == 8
  name = "llama_gqa_untied"
  mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
  reads: list[tuple[str, int]] = []
  real_read = safetensors_io.TensorReader.read

  def counting_read(self, tensor, index, transpose):
    out = real_read(self, tensor, index, transpose)
    reads.append((tensor, out.size))
    return out

  monkeypatch.setattr(safetensors_io.TensorReader, "read", counting_read)
  model, params = load_hf_model(FIXTURES / name, mesh=mesh)
  monkeypatch.setattr(safetensors_io.TensorReader, "read", real_read)

  expected = sh.param_shardings(logical_axes(model), abstract_variables(model), mesh)["params"]
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
  q = params["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor") and q.addressable_shards[0].data.shape == (2, 8, 32)
  assert sum(n for _, n in reads) == sum(x.size for x in jax.tree.leaves(params)), "elements read more than once"
  q_reads = [n for t, n in reads if t == "model.layers.0.self_attn.q_proj.weight"]
  assert len(q_reads) == 8 and max(q_reads) == 8 * 32, q_reads  # 8 shards of [8, 32] of a [64, 32] tensor

  g = _golden(name)
  _, ref_params = load_hf_model(FIXTURES / name)
  ref = _outputs(model, ref_params, g)
  with sh.activation_sharding(mesh):
    tokens = jax.device_put(jnp.asarray(g["tokens"]), sh.replicated(mesh))
    mask = jax.device_put(jnp.asarray(g["mask"]), sh.replicated(mesh))
    logits = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m).logits)(params, tokens, mask)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5)
  assert np.abs(np.asarray(logits) - g["logits"])[g["mask"].astype(bool)].max() <= TOL
