"""GGUF import (`pro_jax.load_gguf`).

Synthetic: tiny Llama / Qwen2 files written with `gguf.GGUFWriter` from known float weights (q / k
rows permuted as llama.cpp's converter does, tensors quantized with `gguf.quants.quantize`) must load
to those weights (a numpy reference computed here) and to the logits of the same weights loaded
from a hand-written transformers checkpoint; bad files raise `CheckpointError` naming file and field.

Real (shared data): SmolLM2-135M-Instruct Q4_1 against tests/golden/fixtures/gguf_smollm2, made by
tests/golden/make_golden_gguf.py with transformers' own GGUF loader and tokenizer (torch venv).
"""

from __future__ import annotations

import json
import pathlib
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import pro_jax
from pro_jax.models.hf_io import CheckpointError

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "fixtures" / "gguf_smollm2"
Q = gguf.GGMLQuantizationType

# tiny model: vocab 64, d 32, 2 layers, 4 heads / 2 kv heads of 8, mlp 64
V, D, NL, H, KV, HD, F = 64, 32, 2, 4, 2, 8, 64
THETA, EPS, CTX = 5000.0, 1e-5, 128


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (half-rotation rows -> interleaved pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_by_index(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse, written out row by row: interleaved row 2i / 2i+1 of a head -> rows i / i + hd/2."""
  out = np.empty_like(w)
  hd = w.shape[0] // n_head
  for h in range(n_head):
    for i in range(hd // 2):
      out[h * hd + i] = w[h * hd + 2 * i]
      out[h * hd + hd // 2 + i] = w[h * hd + 2 * i + 1]
  return out


def _hf_weights(arch: str, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """Random transformers-named float32 weights (scaled so logits are O(1-10))."""
  rng = np.random.default_rng(seed)
  n = lambda *s, scale=0.3: (scale * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
  w = {"model.embed_tokens.weight": n(V, D, scale=1.0), "model.norm.weight": 1 + n(D, scale=0.1)}
  for i in range(NL):
    p = f"model.layers.{i}."
    w.update({p + "input_layernorm.weight": 1 + n(D, scale=0.1),
              p + "post_attention_layernorm.weight": 1 + n(D, scale=0.1),
              p + "self_attn.q_proj.weight": n(H * HD, D), p + "self_attn.k_proj.weight": n(KV * HD, D),
              p + "self_attn.v_proj.weight": n(KV * HD, D), p + "self_attn.o_proj.weight": n(D, H * HD),
              p + "mlp.gate_proj.weight": n(F, D), p + "mlp.up_proj.weight": n(F, D),
              p + "mlp.down_proj.weight": n(D, F)})
    if arch == "qwen2":
      w.update({p + "self_attn.q_proj.bias": n(H * HD), p + "self_attn.k_proj.bias": n(KV * HD),
                p + "self_attn.v_proj.bias": n(KV * HD)})
  if not tied:
    w["lm_head.weight"] = n(V, D)
  return w


_GGUF_NAME = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
  if hf in _GGUF_NAME:
    return _GGUF_NAME[hf]
  _, _, i, *mod, kind = hf.split(".")
  return f"blk.{i}.{_GGUF_NAME['.'.join(mod)]}.{kind}"


def _metadata(arch: str) -> dict:
  a = arch + "."
  return {a + "block_count": ("u32", NL), a + "context_length": ("u32", CTX), a + "embedding_length": ("u32", D),
          a + "feed_forward_length": ("u32", F), a + "attention.head_count": ("u32", H),
          a + "attention.head_count_kv": ("u32", KV), a + "rope.freq_base": ("f32", THETA),
          a + "attention.layer_norm_rms_epsilon": ("f32", EPS), a + "rope.dimension_count": ("u32", HD),
          a + "vocab_size": ("u32", V), "tokenizer.ggml.bos_token_id": ("u32", 1),
          "tokenizer.ggml.eos_token_id": ("u32", 2)}


def _write_gguf(path: pathlib.Path, arch: str, weights: dict[str, np.ndarray], qtypes: dict[str, Q] | None = None,
                metadata: dict | None = None, extra_tensors: dict | None = None) -> dict[str, np.ndarray]:
  """Write `weights` (transformers names) as llama.cpp would; returns each tensor's expected value
  after loading (transformers layout): the float weight, or the dequantized quantization of the
  (permuted) weight, un-permuted row by row."""
  qtypes = qtypes or {}
  w = gguf.GGUFWriter(str(path), arch)
  for key, (kind, value) in (metadata if metadata is not None else _metadata(arch)).items():
    {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string, "arr": w.add_array}[kind](key, value)
  expected = {}
  for hf_name, arr in weights.items():
    name = _gguf_name(hf_name)
    heads = {"attn_q": H, "attn_k": KV}.get(name.split(".")[2] if name.startswith("blk.") else "")
    stored = _llama_cpp_permute(arr, heads) if heads and arch == "llama" else arr
    qtype = qtypes.get(hf_name, Q.F32)
    if qtype == Q.F32:
      w.add_tensor(name, stored.astype(np.float32))
      value = stored.astype(np.float32)
    elif qtype == Q.F16:
      w.add_tensor(name, stored.astype(np.float16))
      value = stored.astype(np.float16).astype(np.float32)
    else:
      data = gguf.quants.quantize(stored, qtype)
      w.add_tensor(name, data, raw_dtype=qtype)
      value = gguf.quants.dequantize(data, qtype).reshape(stored.shape)
    expected[hf_name] = _unpermute_by_index(value, heads) if heads and arch == "llama" else value
  for name, (data, qtype) in (extra_tensors or {}).items():
    w.add_tensor(name, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


def _hf_dir(path: pathlib.Path, arch: str, weights: dict[str, np.ndarray], tied: bool, **cfg_overrides) -> pathlib.Path:
  """The same weights as a transformers checkpoint, config.json written by hand."""
  path.mkdir()
  cfg = {"architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
         "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": NL,
         "num_attention_heads": H, "num_key_value_heads": KV, "max_position_embeddings": CTX, "rms_norm_eps": EPS,
         "rope_theta": THETA, "hidden_act": "silu", "tie_word_embeddings": tied, **cfg_overrides}
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(weights, str(path / "model.safetensors"))
  return path


def _logits(model, params, tokens_BxL) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens_BxL)).logits)


TOKENS = np.random.default_rng(7).integers(0, V, (2, 11)).astype(np.int32)

# every type gguf.quants can quantize, spread over the tensors (q / k of layer 0 stay F32, so the
# permutation is checked exactly; layer 1's q / k are quantized after permutation)
QTYPES = {"model.embed_tokens.weight": Q.F16, "lm_head.weight": Q.Q8_0,
          "model.layers.0.self_attn.v_proj.weight": Q.Q4_0, "model.layers.0.self_attn.o_proj.weight": Q.Q4_1,
          "model.layers.0.mlp.gate_proj.weight": Q.Q5_0, "model.layers.0.mlp.up_proj.weight": Q.Q5_1,
          "model.layers.0.mlp.down_proj.weight": Q.BF16, "model.layers.1.self_attn.q_proj.weight": Q.Q8_0,
          "model.layers.1.self_attn.k_proj.weight": Q.Q4_1, "model.layers.1.self_attn.v_proj.weight": Q.MXFP4,
          "model.layers.1.mlp.down_proj.weight": Q.Q4_0}


def _our_layout(params: dict, hf_name: str) -> np.ndarray:
  """The parameter `hf_name` from our params, in transformers' layout."""
  if hf_name == "model.embed_tokens.weight":
    return np.asarray(params["embed"])
  if hf_name == "lm_head.weight":
    return np.asarray(params["lm_head"]["kernel"]).T
  if hf_name == "model.norm.weight":
    return np.asarray(params["final_norm"]["scale"])
  _, _, i, *mod, kind = hf_name.split(".")
  layer = params["layers"]
  if mod[0] in ("input_layernorm", "post_attention_layernorm"):
    return np.asarray(layer["attn_norm" if mod[0] == "input_layernorm" else "mlp_norm"]["scale"][int(i)])
  block = layer["attn" if mod[0] == "self_attn" else "mlp"][mod[1]]
  leaf = np.asarray(block["kernel" if kind == "weight" else "bias"][int(i)])
  return leaf.T if kind == "weight" else leaf


def test_quant_types_and_qk_permutation_round_trip(tmp_path):
  weights = _hf_weights("llama", tied=False)
  expected = _write_gguf(tmp_path / "m.gguf", "llama", weights, QTYPES)
  q0 = weights["model.layers.0.self_attn.q_proj.weight"]
  assert not np.array_equal(_llama_cpp_permute(q0, H), q0)  # the file really holds permuted rows
  model, params, tok = pro_jax.load_gguf(tmp_path / "m.gguf", tokenizer=False)
  assert tok is None
  c = model.config
  assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.kv_heads, c.hd, c.mlp_dim) == (V, D, NL, H, KV, HD, F)
  assert (c.rope_theta, c.max_seq_len, c.tie_embeddings, c.eos_token_id, c.bos_token_id) == (THETA, CTX, False, 2, 1)
  assert c.norm_eps == pytest.approx(EPS)
  for hf_name, w in weights.items():
    got = _our_layout(params, hf_name)
    if hf_name not in QTYPES:  # F32: exactly the float weights, q / k un-permuted
      np.testing.assert_array_equal(got, w, err_msg=hf_name)
    else:
      np.testing.assert_array_equal(got, expected[hf_name], err_msg=hf_name)
      tol = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2}.get(QTYPES[hf_name], 0.5)
      assert np.abs(got - w).max() < tol * np.abs(w).max(), hf_name  # close to the float weights too


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_logits_match_the_same_weights_from_a_transformers_checkpoint(tmp_path, arch, tied):
  weights = _hf_weights(arch, tied)
  _write_gguf(tmp_path / "m.gguf", arch, weights)
  model, params, _ = pro_jax.load_gguf(tmp_path / "m.gguf", tokenizer=False)
  assert model.config.tie_embeddings is tied and model.config.qkv_bias is (arch == "qwen2")
  ref_model, ref_params = pro_jax.load_hf_model(_hf_dir(tmp_path / "hf", arch, weights, tied))
  ours, ref = _logits(model, params, TOKENS), _logits(ref_model, ref_params, TOKENS)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def _llama_cpp_rope_freqs(theta, dim, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
  """llama.cpp convert_hf_to_gguf's loop for Llama 3.1 (`LlamaModel.generate_extra_tensors`)."""
  import math
  freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
  rope_factors = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      rope_factors.append(1)
    elif wavelen > low_freq_wavelen:
      rope_factors.append(factor)
    else:
      smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      rope_factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(rope_factors, np.float32)


def test_rope_freqs_tensor_is_llama3_scaling(tmp_path):
  theta = 500000.0  # head_dim 8: wavelengths 6, 167, 4440, 118000 cover all three regimes of 8192 / [1, 4]
  factors = _llama_cpp_rope_freqs(theta, HD)
  assert len(set(np.round(factors, 4))) == 3
  weights = _hf_weights("llama", tied=True)
  md = {**_metadata("llama"), "llama.rope.freq_base": ("f32", theta), "llama.context_length": ("u32", 16384)}
  _write_gguf(tmp_path / "m.gguf", "llama", weights, metadata=md, extra_tensors={"rope_freqs.weight": (factors, None)})
  model, params, _ = pro_jax.load_gguf(tmp_path / "m.gguf", tokenizer=False)
  rs = model.config.rope_scaling
  assert (rs.type, rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (
      "llama3", 8.0, 1.0, 4.0, 8192)
  ref_model, ref_params = pro_jax.load_hf_model(_hf_dir(
      tmp_path / "hf", "llama", weights, True, rope_theta=theta, max_position_embeddings=16384,
      rms_norm_eps=float(np.float32(EPS)),  # GGUF stores float32
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}))
  assert ref_model.config == model.config.replace(eos_token_id=None, bos_token_id=None)
  tokens = np.tile(TOKENS, (1, 4))
  np.testing.assert_allclose(_logits(model, params, tokens), _logits(ref_model, ref_params, tokens), atol=1e-5, rtol=0)


def test_mesh_places_params_sharded(tmp_path):
  from pro_jax import sharding as sh
  from pro_jax.models.transformer import abstract_variables, logical_axes
  weights = _hf_weights("llama", tied=False)
  expected = _write_gguf(tmp_path / "m.gguf", "llama", weights, QTYPES)
  mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
  model, params, _ = pro_jax.load_gguf(tmp_path / "m.gguf", tokenizer=False, mesh=mesh)
  want = sh.param_shardings(logical_axes(model), abstract_variables(model), mesh)["params"]
  for got, w in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got.sharding.is_equivalent_to(w, got.ndim), (got.sharding, w)
  k = params["layers"]["attn"]["k_proj"]["kernel"]
  assert len({s.data.shape for s in k.addressable_shards}) == 1 and k.addressable_shards[0].data.shape == (2, 8, 8)
  for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
    np.testing.assert_array_equal(_our_layout(params, name), expected[name])


def test_score_head_and_bfloat16_params(tmp_path):
  weights = _hf_weights("llama", tied=True)
  _write_gguf(tmp_path / "m.gguf", "llama", weights)
  model, params, _ = pro_jax.load_gguf(tmp_path / "m.gguf", tokenizer=False, head="score", num_labels=2,
                                       param_dtype="bfloat16")
  assert params["score"]["kernel"].shape == (D, 2) and params["embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params["embed"]),
                                np.asarray(weights["model.embed_tokens.weight"].astype(jnp.bfloat16)))


def _bad_file(tmp_path, *, arch="llama", drop=(), add=None, extra_tensors=None):
  md = {k: v for k, v in _metadata(arch).items() if k not in drop}
  md.update(add or {})
  path = tmp_path / "bad.gguf"
  _write_gguf(path, arch, _hf_weights("llama", tied=True), metadata=md, extra_tensors=extra_tensors)
  return path


@pytest.mark.parametrize("case,field", [
    (dict(arch="gpt2"), "general.architecture"),
    (dict(drop=("llama.attention.layer_norm_rms_epsilon",)), "llama.attention.layer_norm_rms_epsilon"),
    (dict(drop=("llama.context_length",)), "llama.context_length"),
    (dict(add={"llama.expert_count": ("u32", 8)}), "llama.expert_count"),
    (dict(add={"llama.feed_forward_length": ("arr", [F, F])}), "llama.feed_forward_length"),
    (dict(add={"llama.rope.scaling.type": ("str", "yarn")}), "llama.rope.scaling.type"),
    (dict(add={"llama.rope.dimension_count": ("u32", HD // 2)}), "llama.rope.dimension_count"),
    (dict(extra_tensors={"rope_freqs.weight": (np.array([1, 2, 3, 4], np.float32), None)}), "rope_freqs.weight"),
    (dict(extra_tensors={"blk.0.attn_qkv.weight": (np.ones((3 * D, D), np.float32), None)}),
     "blk.0.attn_qkv.weight"),
    # Q8_1: a type the gguf package cannot dequantize (blocks of 32 values in 40 bytes)
    (dict(extra_tensors={"blk.0.attn_q.bias": (np.zeros((1, 40), np.uint8), Q.Q8_1)}), "Q8_1"),
])
def test_unsupported_file_raises_checkpoint_error_naming_file_and_field(tmp_path, case, field):
  path = _bad_file(tmp_path, **case)
  with pytest.raises(CheckpointError) as e:
    pro_jax.load_gguf(path, tokenizer=False)
  assert str(path) in str(e.value) and field in str(e.value)


def test_missing_tokenizer_and_unreadable_file(tmp_path):
  path = _bad_file(tmp_path)
  with pytest.raises(CheckpointError, match="tokenizer.ggml.tokens"):
    pro_jax.load_gguf(path)
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all")
  with pytest.raises(CheckpointError, match=f"{junk}: not a readable GGUF file"):
    pro_jax.load_gguf(junk)
  with pytest.raises(CheckpointError, match="no such GGUF file"):
    pro_jax.load_gguf(tmp_path / "absent.gguf")


# ----------------------------------------------------------------------------------------------
# the real file


@pytest.fixture(scope="module")
def golden():
  meta = json.loads((GOLDEN / "meta.json").read_text())
  with np.load(GOLDEN / "golden.npz") as z:
    arrays = dict(z)
  return meta, arrays


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
  t0 = time.perf_counter()
  model, params, tok = pro_jax.load_gguf(smollm2_gguf)
  jax.block_until_ready(params)
  print(f"load_gguf SmolLM2-135M Q4_1: {time.perf_counter() - t0:.1f} s")
  return model, params, tok


@pytest.mark.shared_data
def test_smollm2_logits_match_transformers_gguf_loader(smol, golden):
  model, params, _ = smol
  meta, g = golden
  tokens = [g[f"tokens_{k}"] for k in range(len(meta["chats"]))]
  width = max(len(t) for t in tokens)
  batch = np.zeros((len(tokens), width), np.int32)  # right padding: causal, real positions unaffected
  mask = np.zeros_like(batch)
  for k, t in enumerate(tokens):
    batch[k, :len(t)], mask[k, :len(t)] = t, 1
  logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(batch), jnp.asarray(mask)).logits)
  worst_rows, worst_topk = 0.0, 0.0
  for k, t in enumerate(tokens):
    ours = logits[k, :len(t)]
    worst_rows = max(worst_rows, float(np.abs(ours[-meta["last"]:] - g[f"last_logits_{k}"]).max()))
    at_top = np.take_along_axis(ours, g[f"topk_ids_{k}"], axis=-1)
    worst_topk = max(worst_topk, float(np.abs(at_top - g[f"topk_logits_{k}"]).max()))
    assert (ours.argmax(-1) == g[f"topk_ids_{k}"][:, 0]).mean() > 0.95
  print(f"max |diff| vs transformers: full rows {worst_rows:.2e}, top-{meta['topk']} at every position "
        f"{worst_topk:.2e}")
  assert np.abs(g["last_logits_0"]).max() > 5.0
  assert worst_rows <= 1e-3 and worst_topk <= 1e-3


@pytest.mark.shared_data
def test_smollm2_greedy_answer(smol, golden):
  model, params, tok = smol
  meta, _ = golden
  ids = tok.apply_chat_template(meta["greedy"]["messages"], add_generation_prompt=True, tokenize=False)
  prompt = np.asarray([tok(ids)["input_ids"]], np.int32)
  out = pro_jax.generate(model, {"params": params}, prompt, max_new_tokens=12, greedy=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  n = int(out.lengths_B[0])
  assert int(out.tokens_BxN[0, n - 1]) == tok.eos_token_id  # stopped on <|im_end|>
  answer = tok.decode(np.asarray(out.tokens_BxN[0, :n]), skip_special_tokens=True)
  assert answer == "The capital of France is Paris." == meta["greedy"]["answer"]


@pytest.mark.shared_data
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smol, golden):
  _, _, tok = smol
  meta, _ = golden
  ref = meta["tokenizer"]
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      ref["bos_token"], ref["eos_token"], ref["pad_token"], ref["unk_token"])
  assert (tok.eos_token_id, tok.pad_token_id, len(tok), tok.chat_template) == (
      ref["eos_token_id"], ref["pad_token_id"], ref["len"], ref["chat_template"])
  cases = meta["tokenizer_cases"]
  assert sum(c["kind"] == "chat" for c in cases) == 6 and any("日本語" in c["text"] for c in cases)
  for c in cases:
    if c["kind"] == "chat":
      text = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"])
      assert text == c["text"]
    assert tok(c["text"])["input_ids"] == c["ids"], c["text"]
    assert tok.decode(c["ids"]) == c["text"]


@pytest.mark.shared_data
def test_smollm2_export_loads_back_and_in_transformers(smol, golden, tmp_path):
  model, params, tok = smol
  meta, g = golden
  out = pro_jax.save_hf_model(tmp_path / "smol_hf", model, params, tokenizer=tok)
  model2, params2 = pro_jax.load_hf_model(out)
  assert model2.config == model.config
  tokens = g["tokens_1"][None]
  np.testing.assert_array_equal(_logits(model2, params2, tokens), _logits(model, params, tokens))
  # transformers (no torch in this environment): config and tokenizer of the export
  from transformers import AutoConfig
  cfg = AutoConfig.from_pretrained(out)
  assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (
      "llama", 30, 3, True)
  assert cfg.rope_parameters["rope_theta"] == 100000.0
  tok2 = pro_jax.load_tokenizer(out)  # AutoTokenizer on the directory
  for c in meta["tokenizer_cases"]:
    assert tok2(c["text"])["input_ids"] == c["ids"]
  assert tok2.chat_template == tok.chat_template and tok2.pad_token == tok.pad_token
  # the torch side, run once by the fixture script on the same export (transformers' LlamaForCausalLM)
  check = meta["export_check"]
  assert check["class"] == "LlamaForCausalLM" and check["max_abs_logit_diff_vs_gguf_model"] <= 1e-4
  assert check["tokenizer_ids_match"] and check["chat_template_match"]
