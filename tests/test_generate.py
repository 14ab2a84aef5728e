"""generate() and sample_logits(): the KV-cache decode loop against cache-free full forward passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.models import ModelConfig, RopeScaling, Transformer, init_variables
from pro_jax.models.generate import generate, sample_logits

VOCAB = 48
N_NEW = 10  # one response length everywhere: fewer distinct compiles
CONFIGS = {
    # GQA, Qwen2-style q/k/v bias, llama3 rope scaling, untied head, a sliding window (6 slots) that
    # prompt (7) + response (10) exceed.
    "llama_gqa": ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                             qkv_bias=True, rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 16),
                             sliding_window=6),
    # GPT-2: LayerNorm, learned positions, fused c_attn. (Untied: greedy decoding of a tiny random
    # model with tied embeddings just repeats its last token, which would make the test weak.)
    # Gemma-2/3-style: alternating local (window 6, own RoPE theta) / global layers, embedding scaling,
    # norm offset, sandwich norms, q/k norms, GeGLU, attention and final logit soft-capping: the decode
    # step (generate._decode_step) re-implements the forward's embedding, layer and head ends.
    "gemma_mixed": ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=64,
                               sliding_window=6, layer_types=("sliding_attention", "full_attention",
                                                              "sliding_attention"),
                               local_rope_theta=100.0, qk_norm=True, norm_offset=1.0, scale_embeddings=True,
                               mlp_act="gelu_tanh", sandwich_norms=True, query_pre_attn_scalar=16.0,
                               attn_logit_softcap=20.0, final_logit_softcap=15.0),
    "gpt2": ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, arch="gpt2",
                        max_seq_len=64),
}


def _sharpen(variables, factor=8.0, norm_offset=0.0):
  """Scale the final norm (hence the logits) so the tiny random model has peaked next-token
  distributions: greedy paths without near-ties, and sampling that is not uniform noise. (With a
  Gemma norm offset the effective scale is offset + weight.)"""
  params = dict(variables["params"])
  params["final_norm"] = {k: (v + norm_offset) * factor - norm_offset if k == "scale" else v * factor
                          for k, v in params["final_norm"].items()}
  return {**variables, "params": params}


@functools.lru_cache(maxsize=None)
def _init(config, seed=0):
  model = Transformer(config)
  return model, _sharpen(jax.jit(functools.partial(init_variables, model))(jax.random.key(seed)),
                         factor=40.0 if config.final_logit_softcap else 8.0, norm_offset=config.norm_offset)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_vars(request):
  """Every architecture: for the comparisons with the cache-free forward."""
  return _init(CONFIGS[request.param])


@pytest.fixture(scope="module")
def llama(request):
  """One architecture: for the loop logic (EOS, determinism), which does not depend on it."""
  return _init(CONFIGS["llama_gqa"])


def _left_padded_prompts(batch=4, length=7, seed=1):
  """Random prompts with 7, 5, 1, 3 real tokens (left-padded with zeros)."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(1, VOCAB, size=(batch, length)).astype(np.int32)
  n_real = np.array([7, 5, 1, 3])[:batch]
  mask = (np.arange(length)[None, :] >= length - n_real[:, None]).astype(np.int32)
  return tokens * mask, mask


@functools.lru_cache(maxsize=None)
def _jitted_logits(model):
  return jax.jit(lambda v, t, m: model.apply(v, t, m).logits)


def _forward(model, variables, tokens, mask):
  """Cache-free forward over a whole sequence; float64 numpy logits."""
  return np.asarray(_jitted_logits(model)(variables, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_equals_cache_free_recompute(model_and_vars):
  """Greedy tokens and log-probs equal an iterative recompute of the whole sequence at each step."""
  model, variables = model_and_vars
  prompt, mask = _left_padded_prompts()
  n_new = N_NEW
  out = generate(model, variables, prompt, mask, max_new_tokens=n_new, greedy=True)

  # Recompute the whole sequence at every step (no cache). The buffer has a fixed length so the
  # reference compiles once: slots not generated yet are masked padding after the current token,
  # which causal attention cannot see anyway.
  B, P = prompt.shape
  seq = np.concatenate([prompt, np.zeros((B, n_new), np.int32)], axis=1)
  seq_mask = np.concatenate([mask, np.zeros((B, n_new), np.int32)], axis=1)
  ref_tokens, ref_lp = [], []
  for i in range(n_new):
    logits_BxV = _forward(model, variables, seq, seq_mask)[:, P - 1 + i]
    top2 = np.sort(logits_BxV, axis=-1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-4), "near-tie in the reference: test would be ambiguous"
    tok = logits_BxV.argmax(-1)
    ref_tokens.append(tok)
    ref_lp.append(_log_softmax(logits_BxV)[np.arange(B), tok])
    seq[:, P + i] = tok
    seq_mask[:, P + i] = 1

  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.stack(ref_tokens, 1))
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), np.stack(ref_lp, 1), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(out.response_mask_BxN), np.ones((4, n_new)))
  np.testing.assert_array_equal(np.asarray(out.lengths_B), [n_new] * 4)
  np.testing.assert_array_equal(np.asarray(out.sequences_BxT), seq)
  np.testing.assert_array_equal(np.asarray(out.sequence_mask_BxT), seq_mask)
  # The response does not depend on the amount of left padding: row 2 alone, unpadded.
  solo = generate(model, variables, prompt[2:3, -1:], None, max_new_tokens=n_new, greedy=True)
  np.testing.assert_array_equal(np.asarray(solo.tokens_BxN)[0], np.asarray(out.tokens_BxN)[2])


@pytest.mark.parametrize("arch,top_k,top_p", [("llama_gqa", 4, 1.0), ("gpt2", 0, 0.6)])
def test_sampled_tokens_respect_top_k_top_p_and_logprobs(arch, top_k, top_p):
  """Sampling with temperature + top-k / top-p: every emitted token lies in the truncated set computed
  by hand from the cache-free logits, and its log-prob is log_softmax(logits / T) there. (Top-k then
  top-p together: test_sample_top_k_then_top_p.)"""
  model, variables = _init(CONFIGS[arch])
  prompt, mask = _left_padded_prompts()
  n_new, temp = N_NEW, 1.7
  out = generate(model, variables, prompt, mask, max_new_tokens=n_new, rng=jax.random.key(3),
                 temperature=temp, top_k=top_k, top_p=top_p)
  seq = np.asarray(out.sequences_BxT)
  logits = _forward(model, variables, seq, np.asarray(out.sequence_mask_BxT))
  P = prompt.shape[1]
  toks = np.asarray(out.tokens_BxN)
  scaled_BxNxV = logits[:, P - 1:-1] / temp
  logp_BxNxV = _log_softmax(scaled_BxNxV)
  sizes = []
  for b in range(4):
    for i in range(n_new):
      order = np.argsort(-scaled_BxNxV[b, i], kind="stable")
      allowed = order[:top_k] if top_k else order
      p = np.exp(_log_softmax(scaled_BxNxV[b, i, allowed]))
      keep = (np.cumsum(p) - p) < top_p
      sizes.append(int(keep.sum()))
      assert toks[b, i] in set(allowed[keep].tolist()), (top_k, top_p, b, i)
  assert 1 < np.mean(sizes) < VOCAB / 2  # the truncation is real but leaves a choice
  chosen = np.take_along_axis(logp_BxNxV, toks[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), chosen, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(out.lengths_B), [n_new] * 4)


def test_top_k_1_equals_greedy(llama):
  model, variables = llama
  prompt, mask = _left_padded_prompts()
  greedy = generate(model, variables, prompt, mask, max_new_tokens=N_NEW, greedy=True)
  top1 = generate(model, variables, prompt, mask, max_new_tokens=N_NEW, rng=jax.random.key(9), top_k=1)
  np.testing.assert_array_equal(np.asarray(top1.tokens_BxN), np.asarray(greedy.tokens_BxN))
  np.testing.assert_allclose(np.asarray(top1.logprobs_BxN), np.asarray(greedy.logprobs_BxN), atol=1e-6)
  zero_t = generate(model, variables, prompt, mask, max_new_tokens=N_NEW, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(zero_t.tokens_BxN), np.asarray(greedy.tokens_BxN))


def _expected_after_eos(tokens_BxN, eos_ids, pad):
  """Hand-derived truncation: keep up to and including each row's first EOS, pad after."""
  tokens = np.array(tokens_BxN)
  mask = np.ones_like(tokens)
  for b in range(tokens.shape[0]):
    hits = np.flatnonzero(np.isin(tokens[b], eos_ids))
    if hits.size:
      tokens[b, hits[0] + 1:] = pad
      mask[b, hits[0] + 1:] = 0
  return tokens, mask


@pytest.mark.parametrize("sampled", [False, True])
def test_eos_stops_rows_independently(llama, sampled):
  """Rows stop at their own first EOS; the prefix before it is unchanged, pads and mask after it."""
  model, variables = llama
  prompt, mask = _left_padded_prompts()
  kw = dict(rng=jax.random.key(5), temperature=1.3) if sampled else dict(greedy=True)
  n_new, pad = N_NEW, 0
  free = np.asarray(generate(model, variables, prompt, mask, max_new_tokens=n_new, eos_token_id=[], **kw)
                    .tokens_BxN)
  # Pick EOS ids whose first occurrences end the rows at different steps, leaving one row unfinished.
  first = {}
  for b in range(4):
    for i, t in enumerate(free[b]):
      first.setdefault(int(t), {}).setdefault(b, i)
  eos = None
  for t, rows in sorted(first.items(), key=lambda kv: -len(kv[1])):
    if 2 <= len(rows) < 4 and len(set(rows.values())) >= 2 and max(rows.values()) < n_new - 1:
      eos = t
      break
  assert eos is not None, "no usable EOS candidate in this seed"
  for eos_arg in (eos, [eos, VOCAB - 1]):
    out = generate(model, variables, prompt, mask, max_new_tokens=n_new, eos_token_id=eos_arg,
                   pad_token_id=pad, **kw)
    ids = [eos_arg] if isinstance(eos_arg, int) else eos_arg
    exp_tokens, exp_mask = _expected_after_eos(free, ids, pad)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN), exp_tokens)
    np.testing.assert_array_equal(np.asarray(out.response_mask_BxN), exp_mask)
    np.testing.assert_array_equal(np.asarray(out.lengths_B), exp_mask.sum(1))
    assert np.all(np.asarray(out.logprobs_BxN)[exp_mask == 0] == 0)
    assert len(set(exp_mask.sum(1).tolist())) >= 2  # rows really stopped at different steps
    np.testing.assert_array_equal(np.asarray(out.sequence_mask_BxT), np.concatenate([mask, exp_mask], 1))


def test_all_rows_finish_early(llama):
  """When every row emits EOS the loop ends; the remaining slots are pad with mask 0."""
  model, variables = llama
  prompt, mask = _left_padded_prompts()
  free = np.asarray(generate(model, variables, prompt, mask, max_new_tokens=N_NEW, greedy=True).tokens_BxN)
  eos = sorted(set(free[:, 0].tolist()))  # every row stops at step 0
  out = generate(model, variables, prompt, mask, max_new_tokens=N_NEW, greedy=True, eos_token_id=eos,
                 pad_token_id=7)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN)[:, 0], free[:, 0])
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN)[:, 1:], 7)
  np.testing.assert_array_equal(np.asarray(out.response_mask_BxN)[:, 1:], 0)
  np.testing.assert_array_equal(np.asarray(out.lengths_B), [1, 1, 1, 1])


def test_deterministic_given_rng_and_bare_params(llama):
  model, variables = llama
  prompt, mask = _left_padded_prompts()
  kw = dict(max_new_tokens=N_NEW, temperature=1.3)
  a = generate(model, variables, prompt, mask, rng=jax.random.key(11), **kw)
  b = generate(model, variables["params"], prompt, mask, rng=jax.random.key(11), **kw)  # bare params
  c = generate(model, variables, prompt, mask, rng=jax.random.key(12), **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens_BxN), np.asarray(b.tokens_BxN))
  np.testing.assert_array_equal(np.asarray(a.logprobs_BxN), np.asarray(b.logprobs_BxN))
  assert not np.array_equal(np.asarray(a.tokens_BxN), np.asarray(c.tokens_BxN))
  none = generate(model, variables, prompt, mask, rng=jax.random.key(11), return_logprobs=False, **kw)
  assert none.logprobs_BxN is None


def test_generate_rejects_bad_input():
  model, variables = _init(CONFIGS["gpt2"])
  prompt, mask = _left_padded_prompts()
  right = mask[:, ::-1].copy()
  with pytest.raises(ValueError, match="row 1 is not left-padded"):
    generate(model, variables, prompt, right, max_new_tokens=2, greedy=True)
  empty = mask.copy()
  empty[3] = 0
  with pytest.raises(ValueError, match="row 3 has no real token"):
    generate(model, variables, prompt, empty, max_new_tokens=2, greedy=True)
  with pytest.raises(ValueError, match="needs rng"):
    generate(model, variables, prompt, mask, max_new_tokens=2)
  with pytest.raises(ValueError, match="max_seq_len 64"):
    generate(model, variables, prompt, mask, max_new_tokens=60, greedy=True)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, variables, prompt, mask, max_new_tokens=2, rng=jax.random.key(0), top_p=0.0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(model, variables, prompt, mask, max_new_tokens=2, greedy=True, eos_token_id=VOCAB)
  score_model = Transformer(CONFIGS["gpt2"].replace(head="score"))
  with pytest.raises(ValueError, match="LM head"):
    generate(score_model, variables, prompt, mask, max_new_tokens=2, greedy=True)


# ---------------------------------------------------------------------------------------- sample_logits

PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
N_SAMPLES = 40_000


def _frequencies(temperature=1.0, top_k=0, top_p=1.0, logits=None, seed=0):
  logits = np.log(PROBS) if logits is None else logits
  logits_BxV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_SAMPLES, len(logits)))
  tok, lp = sample_logits(logits_BxV, jax.random.key(seed), temperature, top_k, top_p)
  tok = np.asarray(tok)
  return np.bincount(tok, minlength=len(logits)) / N_SAMPLES, tok, np.asarray(lp)


def _assert_matches(freq, expected):
  """Pearson chi-square over the support of `expected` (df <= 4): < 25 is p > 1e-4."""
  support = expected > 0
  assert np.all(freq[~support] == 0), f"excluded tokens were sampled: {freq}"
  chi2 = N_SAMPLES * np.sum((freq[support] - expected[support]) ** 2 / expected[support])
  assert chi2 < 25.0, (chi2, freq, expected)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sample_frequencies_follow_tempered_distribution(temperature):
  freq, tok, lp = _frequencies(temperature)
  expected = PROBS ** (1 / temperature) / np.sum(PROBS ** (1 / temperature))
  _assert_matches(freq, expected)
  np.testing.assert_allclose(lp, np.log(expected)[tok], atol=1e-5)


def test_sample_top_k_keeps_exactly_k():
  freq, tok, lp = _frequencies(top_k=2)
  _assert_matches(freq, np.array([0.4, 0.3, 0, 0, 0]) / 0.7)
  np.testing.assert_allclose(lp, np.log(PROBS)[tok], atol=1e-5)  # log-probs before truncation
  # With ties, still exactly k candidates.
  freq, _, _ = _frequencies(top_k=3, logits=np.zeros(5))
  assert np.count_nonzero(freq) == 3
  _assert_matches(freq, np.array([1, 1, 1, 0, 0]) / 3)
  freq, _, _ = _frequencies(top_k=99)  # k > V: no truncation
  _assert_matches(freq, PROBS)


@pytest.mark.parametrize("top_p,support", [(0.35, 1), (0.65, 2), (0.8, 3), (0.9, 4), (0.97, 5)])
def test_sample_top_p_keeps_smallest_set(top_p, support):
  """Sorted probs 0.4, 0.3, 0.15, 0.1, 0.05: the smallest prefix with mass >= p."""
  freq, _, _ = _frequencies(top_p=top_p)
  expected = np.where(np.arange(5) < support, PROBS, 0)
  _assert_matches(freq, expected / expected.sum())


def test_sample_top_k_then_top_p():
  """top-k first, then top-p on the renormalized top-k mass: k=3 -> (0.47, 0.35, 0.18); p=0.8 -> 2."""
  freq, _, _ = _frequencies(top_k=3, top_p=0.8)
  _assert_matches(freq, np.array([0.4, 0.3, 0, 0, 0]) / 0.7)


def test_sample_greedy_and_zero_temperature():
  logits_BxV = jax.random.normal(jax.random.key(1), (16, 11))
  argmax = np.argmax(np.asarray(logits_BxV), -1)
  tok, lp = sample_logits(logits_BxV, None, greedy=True)
  np.testing.assert_array_equal(np.asarray(tok), argmax)
  np.testing.assert_allclose(np.asarray(lp), _log_softmax(np.asarray(logits_BxV, np.float64))[np.arange(16), argmax],
                             atol=1e-6)
  tok0, _ = sample_logits(logits_BxV, None, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(tok0), argmax)
  # A very small temperature samples the argmax too.
  tok_small, _ = sample_logits(logits_BxV, jax.random.key(0), temperature=1e-4)
  np.testing.assert_array_equal(np.asarray(tok_small), argmax)
  with pytest.raises(ValueError, match="needs an rng"):
    sample_logits(logits_BxV, None)
  with pytest.raises(ValueError, match="temperature"):
    sample_logits(logits_BxV, jax.random.key(0), temperature=-1.0)
  with pytest.raises(ValueError, match="top_k"):
    sample_logits(logits_BxV, jax.random.key(0), top_k=-2)


# ------------------------------------------------------------------------------------- real checkpoint

# karpathy/llama2.c doc/stories260K.md: the greedy (temperature 0) sample from BOS.
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high")


def test_stories260k_greedy_from_bos(stories260k):
  """The real pretrained stories260K through generate() (KV cache) reproduces llama2.c's sample."""
  from pro_jax.models.llama2c import load_llama2c
  model, params, tokenizer = load_llama2c(stories260k / "stories260K.bin")
  n_new = len(tokenizer(STORY)["input_ids"]) + 4
  bos = model.config.bos_token_id
  # BOS alone, and BOS left-padded by 3 slots holding arbitrary ids: the same story.
  prompt = np.array([[0, 0, 0, bos], [5, 6, 7, bos]], np.int32)
  mask = np.array([[0, 0, 0, 1], [0, 0, 0, 1]], np.int32)
  out = generate(model, params, prompt, mask, max_new_tokens=n_new, greedy=True, eos_token_id=[])
  for row in np.asarray(out.tokens_BxN):
    text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
    assert text.startswith(STORY), text
