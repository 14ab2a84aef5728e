"""llama2.c checkpoints: the real pretrained stories260K reproduces llama2.c's documented sample."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pro_jax.models.llama2c import Llama2cError, load_llama2c, permute_rotary, read_llama2c_arrays

# karpathy/llama2.c doc/stories260K.md: greedy (temperature 0) sample from BOS.
EXPECTED = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
            "she saw a big, red ball. She wanted to play with it, but it was too high")


@pytest.fixture(scope="module")
def loaded(stories260k):
  return load_llama2c(stories260k / "stories260K.bin")


def test_config_from_header(loaded):
  model, params, tok = loaded
  c = model.config
  assert (c.d_model, c.mlp_dim, c.n_layers, c.n_heads, c.kv_heads, c.vocab_size, c.max_seq_len) == (
      64, 172, 5, 8, 4, 512, 512)
  assert c.tie_embeddings and "lm_head" not in params and (c.bos_token_id, c.eos_token_id) == (1, 2)
  assert sum(x.size for x in jax.tree.leaves(params)) == c.num_params() == 512 * 64 + 5 * (
      64 * 64 * 2 + 2 * 32 * 64 + 3 * 172 * 64 + 2 * 64) + 64


def greedy(model, params, n_tokens: int) -> list[int]:
  """Cache-free greedy decoding from BOS: one jitted forward over a fixed-length buffer per step."""
  fwd = jax.jit(lambda p, buf, t: jnp.argmax(model.apply({"params": p}, buf).logits[0, t]))
  buf = np.zeros((1, n_tokens), np.int32)
  buf[0, 0] = 1  # BOS; the zeros after position t are never seen by position t (causal)
  for t in range(n_tokens - 1):
    buf[0, t + 1] = int(fwd(params, jnp.asarray(buf), t))
  return buf[0].tolist()


def test_greedy_sample_matches_llama2c(loaded):
  model, params, tok = loaded
  n = len(tok(EXPECTED)["input_ids"]) + 4  # BOS + the sample's tokens + a margin
  ids = greedy(model, params, n)
  text = tok.decode(ids, skip_special_tokens=True)
  print(f"\nstories260K greedy from BOS ({n} tokens): {text!r}")
  assert text.startswith(EXPECTED), text


def _reference_logits(arrays: dict, h: dict, tokens: list[int]) -> np.ndarray:
  """llama2.c's forward (run.c) in NumPy: interleaved-pair RoPE on the file's own (unpermuted) weights."""
  D, L, nh, nkv = h["dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]
  hd = D // nh
  x = arrays["token_embedding"][tokens].astype(np.float64)  # [T, D]
  T = len(tokens)

  def rms(v, w):
    return w * v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + 1e-5)

  def rope(v, n):  # v [T, n * hd]; rotate pairs (2i, 2i+1) by pos * 10000^(-2i/hd)
    v = v.reshape(T, n, hd // 2, 2)
    freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None, None] * freq[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    out = np.stack([v[..., 0] * c - v[..., 1] * s, v[..., 0] * s + v[..., 1] * c], axis=-1)
    return out.reshape(T, n, hd)

  for l in range(L):
    xn = rms(x, arrays["rms_att"][l])
    q = rope(xn @ arrays["wq"][l].T, nh)
    k = rope(xn @ arrays["wk"][l].T, nkv)
    v = (xn @ arrays["wv"][l].T).reshape(T, nkv, hd)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    att = np.where(np.tril(np.ones((T, T), bool))[None], att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    x = x + np.einsum("hqk,khd->qhd", att, v).reshape(T, D) @ arrays["wo"][l].T
    xn = rms(x, arrays["rms_ffn"][l])
    a1, a3 = xn @ arrays["w1"][l].T, xn @ arrays["w3"][l].T
    x = x + (a1 / (1 + np.exp(-a1)) * a3) @ arrays["w2"][l].T
  return rms(x, arrays["rms_final"]) @ arrays["token_embedding"].T


def test_logits_match_llama2c_reference(loaded, stories260k):
  """The wq / wk permutation makes HF-style RoPE equal llama2.c's interleaved RoPE."""
  model, params, tok = loaded
  h, arrays = read_llama2c_arrays(stories260k / "stories260K.bin")
  tokens = tok("Once upon a time, there was a big dog.")["input_ids"]
  ref = _reference_logits(arrays, h, tokens)
  ours = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t).logits)(params, jnp.asarray([tokens]))[0])
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_tokenizer(loaded, stories260k):
  import sentencepiece as spm
  _, _, tok = loaded
  assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (512, 1, 2, 0)
  sp = spm.SentencePieceProcessor(model_file=str(stories260k / "tok512.model"))
  ids = tok(EXPECTED)["input_ids"]
  assert ids[0] == 1 and ids[1:] == sp.encode(EXPECTED)  # BOS + SentencePiece's own ids
  assert ids[:4] == [1, 403, 407, 261]  # <s> ▁Once ▁upon ▁a
  assert tok.decode(ids, skip_special_tokens=True) == EXPECTED
  text = 'Tom said, "Wow! 3 cats\nand 2 dogs."'
  assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_permute_rotary_hand_example():
  # one head, head_dim 4: llama2.c rows (a0, a1) (b0, b1) are pairs; HF wants (a0, b0 | a1, b1)
  w = np.array([[1.0], [2.0], [3.0], [4.0]])
  np.testing.assert_array_equal(permute_rotary(w, 1)[:, 0], [1.0, 3.0, 2.0, 4.0])
  w2 = np.arange(8.0)[:, None]  # two heads of head_dim 4: permuted within each head
  np.testing.assert_array_equal(permute_rotary(w2, 2)[:, 0], [0, 2, 1, 3, 4, 6, 5, 7])


def test_bad_files(tmp_path, stories260k):
  data = (stories260k / "stories260K.bin").read_bytes()
  short = tmp_path / "short.bin"
  short.write_bytes(data[:-4])
  with pytest.raises(Llama2cError, match=r"short\.bin: 1056536 bytes, but its header .* implies 1056540 bytes"):
    load_llama2c(short)
  v1 = tmp_path / "v1.bin"
  v1.write_bytes(np.array([0x616B3432, 1], "<i4").tobytes() + data[8:])
  with pytest.raises(Llama2cError, match=r"v1\.bin: a llama2.c version-1/2 export"):
    load_llama2c(v1)
  with pytest.raises(Llama2cError, match="no such llama2.c checkpoint"):
    load_llama2c(tmp_path / "absent.bin")


def test_load_tokenizer_errors(tmp_path):
  from pro_jax.models.tokenizer import TokenizerError, load_tokenizer
  with pytest.raises(TokenizerError, match="no tokenizer files"):
    load_tokenizer(tmp_path)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"\x00not a protobuf\xff" * 3)
  with pytest.raises(TokenizerError, match=r"bad\.model: not a SentencePiece model"):
    load_tokenizer(bad)
  with pytest.raises(TokenizerError, match="no such file"):
    load_tokenizer(tmp_path / "absent.json")
