"""Model invariants on tiny random models: padding, layer-loop variants, GQA, dtypes, heads, gradients,
causality, RoPE scaling, the KV cache layout and config validation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.models import LoRAConfig, ModelConfig, RopeScaling, Transformer, init_cache, init_variables
from pro_jax.models.config import LLAMA_LORA_TARGETS
from pro_jax.models.transformer import abstract_variables, rope_inv_freq

V = 40
LLAMA = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48)
GPT2 = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=48, arch="gpt2", max_seq_len=32,
                   tie_embeddings=True)
ARCHS = {"llama": LLAMA, "gpt2": GPT2}


@functools.lru_cache(maxsize=None)
def _params(config, seed=0):
  return jax.jit(functools.partial(init_variables, Transformer(config)))(jax.random.key(seed))["params"]


@functools.lru_cache(maxsize=None)
def _apply_fn(config):
  return jax.jit(lambda p, t, m: Transformer(config).apply({"params": p}, t, m))


def _out(config, params, tokens, mask):
  return _apply_fn(config)(params, jnp.asarray(tokens), jnp.asarray(mask))


def _tokens(B, L, seed=1):
  return np.asarray(jax.random.randint(jax.random.key(seed), (B, L), 1, V), np.int32)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_padding_left_and_right_match_unpadded(arch):
  """Rows holding prefixes of one sequence (lengths 10, 7, 4) padded left or right give, at their
  real slots, the logits of the unpadded sequence (causal: a prefix's logits are the sequence's)."""
  config, L = ARCHS[arch], 10
  params = _params(config)
  base = _tokens(1, L)[0]
  n_real = [10, 7, 4]
  full = np.asarray(_out(config, params, np.tile(base, (3, 1)), np.ones((3, L), np.int32)).logits)[0]
  left_t, left_m = np.zeros((3, L), np.int32), np.zeros((3, L), np.int32)
  right_t, right_m = np.full((3, L), 3, np.int32), np.zeros((3, L), np.int32)  # pad id 3: a real id
  for b, n in enumerate(n_real):
    left_t[b, L - n:], left_m[b, L - n:] = base[:n], 1
    right_t[b, :n], right_m[b, :n] = base[:n], 1
  left = np.asarray(_out(config, params, left_t, left_m).logits)
  right = np.asarray(_out(config, params, right_t, right_m).logits)
  for b, n in enumerate(n_real):
    np.testing.assert_allclose(left[b, L - n:], full[:n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(right[b, :n], full[:n], atol=1e-5, rtol=0)
  # Without the mask, padding would change the result (the test can fail).
  no_mask = np.asarray(_out(config, params, left_t, np.ones((3, L), np.int32)).logits)
  assert np.abs(no_mask[2, L - 4:] - full[:4]).max() > 1e-3


@functools.lru_cache(maxsize=None)
def _loss_and_grad_fn(config):
  def loss(p, tokens, mask):
    out = Transformer(config).apply({"params": p}, tokens, mask)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)) + jnp.mean(out.values ** 2)
  return jax.jit(jax.value_and_grad(loss))


def _loss_and_grad(config, params, tokens, mask):
  return _loss_and_grad_fn(config)(params, tokens, mask)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
                                     dict(remat="dots_no_batch", scan_layers=False), dict(remat="save_proj"),
                                     dict(remat="save_attn", scan_layers=False)])
def test_layer_loop_variants_same_outputs_and_grads(variant, monkeypatch):
  from pro_jax.models import transformer

  config = LLAMA.replace(value_head=True)
  params = _params(config)
  tokens = jnp.asarray(_tokens(2, 8))
  mask = jnp.ones((2, 8), jnp.int32).at[0, :2].set(0)
  loss, grad = _loss_and_grad(config.replace(**variant), params, tokens, mask)
  # the reference is a real scan over the layers (small stacks are unrolled by default)
  monkeypatch.setattr(transformer, "UNROLL_MAX_LAYERS", 0)
  assert transformer.scans_layers(config) and config.n_layers > 1
  ref_loss, ref_grad = _loss_and_grad_fn.__wrapped__(config)(params, tokens, mask)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for (path, g), r in zip(jax.tree.flatten_with_path(grad)[0], jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def _projection_dots(jaxpr) -> int:
  """dot_general equations without batch dimensions (the projections), in every nested jaxpr."""
  from jax.extend.core import jaxprs_in_params
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and not eqn.params["dimension_numbers"][1][0]:
      n += 1
    for sub in jaxprs_in_params(eqn.params):
      n += _projection_dots(sub)
  return n


def test_named_remat_policies_skip_recomputing_projections():
  """`remat="save_proj"` saves the tagged projection outputs, so the LoRA step's backward re-runs no
  projection: as many projection matmuls as without remat; "full" re-runs every forward one (more);
  "save_attn" / "save_mlp" re-run only the MLP's / the attention's (in between)."""
  config = LLAMA.replace(lora=LoRAConfig(rank=4, alpha=8.0, targets=LLAMA_LORA_TARGETS), scan_layers=False)
  tokens = jnp.asarray(_tokens(2, 8))
  variables = Transformer(config).init(jax.random.key(0), tokens)
  params, lora = variables["params"], variables["lora"]

  def count(remat):
    def loss(lo):
      return jnp.mean(Transformer(config.replace(remat=remat)).apply({"params": params, "lora": lo}, tokens).logits)
    return _projection_dots(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr)

  n = {r: count(r) for r in ("none", "full", "save_proj", "save_attn", "save_mlp")}
  assert n["save_proj"] == n["none"] < n["save_attn"] < n["save_mlp"] < n["full"], n


def test_gqa_equals_mha_with_repeated_kv_weights():
  """Query head h uses KV head h // (n_heads / n_kv_heads) (HF repeat_kv): repeating each K/V head's
  columns (and biases) that many times gives an MHA model with the same outputs."""
  gqa = LLAMA.replace(n_kv_heads=2, qkv_bias=True)
  mha = gqa.replace(n_kv_heads=None)
  params = jax.tree.map(np.asarray, _params(gqa))
  group, hd, n_kv = gqa.n_heads // gqa.kv_heads, gqa.hd, gqa.kv_heads
  attn = dict(params["layers"]["attn"])
  for name in ("k_proj", "v_proj"):
    kernel = attn[name]["kernel"]  # [layers, D, n_kv * hd]
    n_layers, d = kernel.shape[:2]
    heads = kernel.reshape(n_layers, d, n_kv, hd)
    new_kernel = np.concatenate([heads[:, :, [j]] for j in range(n_kv) for _ in range(group)], axis=2)
    bias = attn[name]["bias"].reshape(n_layers, n_kv, hd)
    new_bias = np.concatenate([bias[:, [j]] for j in range(n_kv) for _ in range(group)], axis=1)
    attn[name] = {"kernel": new_kernel.reshape(n_layers, d, -1), "bias": new_bias.reshape(n_layers, -1)}
  mha_params = {**params, "layers": {**params["layers"], "attn": attn}}
  assert mha_params["layers"]["attn"]["k_proj"]["kernel"].shape[-1] == gqa.n_heads * hd
  tokens, mask = _tokens(2, 9), np.ones((2, 9), np.int32)
  mask[1, :3] = 0
  np.testing.assert_allclose(np.asarray(_out(mha, mha_params, tokens, mask).logits),
                             np.asarray(_out(gqa, params, tokens, mask).logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bf16_compute_close_to_fp32(arch):
  config = ARCHS[arch]
  params = _params(config)
  tokens, mask = _tokens(2, 9), np.ones((2, 9), np.int32)
  ref = _out(config, params, tokens, mask)
  bf16 = _out(config.replace(dtype="bfloat16"), params, tokens, mask)
  assert bf16.hidden.dtype == jnp.bfloat16 and bf16.logits.dtype == jnp.float32
  ref_l, bf_l = np.asarray(ref.logits), np.asarray(bf16.logits)
  rel = np.abs(bf_l - ref_l).max() / np.abs(ref_l).max()
  assert 0 < rel < 0.05, rel
  # bf16 parameters are stored as bf16.
  bf16_params = abstract_variables(Transformer(config.replace(param_dtype="bfloat16")))["params"]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_params))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_score_and_value_heads_by_hand(arch):
  """Scores = final hidden state at the last non-pad token @ score kernel (HF sequence
  classification); values = hidden @ value kernel + bias at every slot."""
  config = ARCHS[arch].replace(head="score", num_labels=3, value_head=True, tie_embeddings=False)
  params = _params(config)
  L = 8
  tokens = _tokens(3, L)
  mask = np.ones((3, L), np.int32)
  mask[0, :3] = 0  # left-padded: last real slot L-1
  mask[1, 5:] = 0  # right-padded: last real slot 4
  out = _out(config, params, tokens, mask)
  assert out.logits is None and out.scores.shape == (3, 3) and out.values.shape == (3, L)
  hidden = np.asarray(out.hidden, np.float64)
  last = [L - 1, 4, L - 1]
  kernel = np.asarray(params["score"]["kernel"], np.float64)
  expected = np.stack([hidden[b, last[b]] @ kernel for b in range(3)])
  np.testing.assert_allclose(np.asarray(out.scores), expected, atol=1e-5, rtol=0)
  vk, vb = np.asarray(params["value_head"]["kernel"], np.float64), np.asarray(params["value_head"]["bias"])
  np.testing.assert_allclose(np.asarray(out.values), (hidden @ vk)[..., 0] + vb[0], atol=1e-5, rtol=0)
  # The right-padded row's score does not depend on what sits in its padding.
  tokens2 = tokens.copy()
  tokens2[1, 5:] = (tokens2[1, 5:] + 7) % V
  np.testing.assert_allclose(np.asarray(_out(config, params, tokens2, mask).scores)[1],
                             np.asarray(out.scores)[1], atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gradient_matches_finite_differences(arch):
  """Central differences of the LM loss along a random direction and along three single parameters."""
  config = ARCHS[arch]
  params = jax.tree.map(lambda x: x * 5.0, _params(config))  # larger weights: a less flat loss
  tokens = jnp.asarray(_tokens(2, 8))
  mask = jnp.ones((2, 8), jnp.int32).at[1, :2].set(0)

  def loss(p):
    logits = Transformer(config).apply({"params": p}, tokens, mask).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  grad = jax.jit(jax.grad(loss))(params)

  @jax.jit
  def central_difference(u, eps):
    plus = loss(jax.tree.map(lambda p, d: p + eps * d, params, u))
    minus = loss(jax.tree.map(lambda p, d: p - eps * d, params, u))
    return (plus - minus) / (2 * eps)

  rs = np.random.RandomState(3)
  direction = jax.tree.map(lambda x: rs.standard_normal(x.shape).astype(np.float32), params)
  norm = math.sqrt(sum(float(np.sum(d * d)) for d in jax.tree.leaves(direction)))
  direction = jax.tree.map(lambda d: d / norm, direction)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  assert abs(analytic) > 1e-2
  np.testing.assert_allclose(float(central_difference(direction, 1e-3)), analytic, rtol=1e-2)
  attn_in = "q_proj" if arch == "llama" else "c_attn"
  mlp_out = "down_proj" if arch == "llama" else "c_proj"
  for path in (("layers", "attn", attn_in, "kernel"), ("layers", "mlp", mlp_out, "kernel"), ("embed",)):
    g = np.asarray(functools.reduce(lambda n, k: n[k], path, grad))
    idx = np.unravel_index(int(np.argmax(np.abs(g))), g.shape)  # a well-conditioned entry
    onehot = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params)
    functools.reduce(lambda n, k: n[k], path, onehot)[idx] = 1.0
    np.testing.assert_allclose(float(central_difference(onehot, 1e-3)), g[idx], rtol=1e-2, err_msg=str(path))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_causal(arch):
  config = ARCHS[arch]
  params = _params(config)
  tokens = _tokens(2, 9)
  mask = np.ones((2, 9), np.int32)
  changed = tokens.copy()
  changed[:, 6] = (changed[:, 6] + 5) % V
  a = np.asarray(_out(config, params, tokens, mask).logits)
  b = np.asarray(_out(config, params, changed, mask).logits)
  np.testing.assert_allclose(b[:, :6], a[:, :6], atol=1e-6, rtol=0)
  assert np.abs(b[:, 6:] - a[:, 6:]).min(axis=-1).max() > 0 and np.abs(b[:, 6:] - a[:, 6:]).max() > 1e-3


def _hf_default_inv_freq(theta, dim):
  return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))


def _meta_llama3_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
  """Meta's reference `apply_scaling` (llama-models), one frequency at a time."""
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      out.append(freq)
    elif wavelen > low_freq_wavelen:
      out.append(freq / factor)
    else:
      smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_rope_scaling_inv_freq_by_hand():
  # Llama 3.1 8B: theta 500000, head_dim 128, factor 8, low 1, high 4, original context 8192.
  base = ModelConfig(vocab_size=8, d_model=128, n_layers=1, n_heads=1, mlp_dim=8, rope_theta=500000.0)
  ref = _hf_default_inv_freq(500000.0, 128)
  np.testing.assert_allclose(rope_inv_freq(base), ref.astype(np.float32), rtol=1e-7)
  linear = base.replace(rope_scaling=RopeScaling("linear", factor=4.0))
  np.testing.assert_allclose(rope_inv_freq(linear), (ref / 4.0).astype(np.float32), rtol=1e-7)
  llama3 = base.replace(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
  expected = _meta_llama3_scaling(ref, 8.0, 1.0, 4.0, 8192)
  np.testing.assert_allclose(rope_inv_freq(llama3), expected.astype(np.float32), rtol=1e-7)
  wavelen = 2 * math.pi / ref  # all three regimes occur: unchanged, divided by 8, smoothed
  assert (wavelen < 8192 / 4).any() and (wavelen > 8192).any() and ((wavelen >= 2048) & (wavelen <= 8192)).any()
  with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
    rope_inv_freq(base.replace(rope_scaling=RopeScaling("yarn", factor=2.0)))


def test_rope_scaling_reaches_the_forward():
  config = LLAMA
  params = _params(config)
  tokens, mask = _tokens(2, 9), np.ones((2, 9), np.int32)
  a = np.asarray(_out(config, params, tokens, mask).logits)
  b = np.asarray(_out(config.replace(rope_scaling=RopeScaling("linear", factor=4.0)), params, tokens, mask).logits)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)  # position 0: no rotation
  assert np.abs(a[:, 1:] - b[:, 1:]).max() > 1e-4


def test_init_cache_shapes():
  cache = init_cache(LLAMA, batch=3, max_len=17)
  assert set(cache) == {"k", "v"}
  assert cache["k"].shape == cache["v"].shape == (2, 3, 17, 2, 8)  # layers, B, T, kv heads, head dim
  assert cache["k"].dtype == jnp.float32 and not np.any(np.asarray(cache["k"]))
  assert init_cache(GPT2.replace(dtype="bfloat16"), 1, 5)["v"].shape == (2, 1, 5, 4, 8)
  assert init_cache(GPT2.replace(dtype="bfloat16"), 1, 5)["v"].dtype == jnp.bfloat16
  assert init_cache(LLAMA.replace(head_dim=12), 1, 4)["k"].shape == (2, 1, 4, 2, 12)
  # A forward pass with a cache returns one of the same layout, with the new keys written.
  params = _params(LLAMA)
  tokens = jnp.asarray(_tokens(3, 5))
  out = jax.jit(lambda p, t, c: Transformer(LLAMA).apply({"params": p}, t, cache=c, cache_index=2,
                                                         cache_mask_BxT=jnp.ones((3, 17), jnp.int32)))(
                                                             params, tokens, cache)
  assert out.cache["k"].shape == cache["k"].shape
  written = np.abs(np.asarray(out.cache["k"])).sum(axis=(0, 1, 3, 4)) > 0
  np.testing.assert_array_equal(written, [False, False] + [True] * 5 + [False] * 10)
  with pytest.raises(ValueError, match="cache_mask_BxT is required"):
    Transformer(LLAMA).apply({"params": params}, tokens, cache=cache)


@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=0), r"ModelConfig.vocab_size must be positive, got 0"),
    (dict(n_layers=-1), r"ModelConfig.n_layers must be positive, got -1"),
    (dict(arch="bert"), r"ModelConfig.arch must be 'llama' or 'gpt2', got 'bert'"),
    (dict(head="lm_head"), r"ModelConfig.head must be 'lm', 'score' or 'none', got 'lm_head'"),
    (dict(n_kv_heads=3), r"n_heads=4 is not a multiple of n_kv_heads=3"),
    (dict(d_model=30), r"d_model=30 not divisible by n_heads=4; set head_dim"),
    (dict(remat="everything"), r"ModelConfig.remat: unknown policy 'everything'"),
    (dict(arch="gpt2", n_kv_heads=2), r"GPT-2 has no grouped-query attention"),
    (dict(lora=LoRAConfig(targets=("c_attn",))), r"LoRA target\(s\) \['c_attn'\] do not exist in a llama model"),
    (dict(arch="gpt2", lora=LoRAConfig(targets=("q_proj",))),
     r"LoRA target\(s\) \['q_proj'\] do not exist in a gpt2 model"),
])
def test_config_validation_messages(kwargs, message):
  base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=48)
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**base, **kwargs})


def test_lora_and_dict_validation_messages():
  with pytest.raises(ValueError, match="LoRAConfig.rank must be positive, got 0"):
    LoRAConfig(rank=0)
  with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv'\]"):
    LoRAConfig(targets=("qkv",))
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\): \['n_embd'\]"):
    ModelConfig.from_dict({**LLAMA.to_dict(), "n_embd": 32})
  # A round trip through a plain dict (as in a checkpoint's JSON) gives the same, hashable config.
  cfg = LLAMA.replace(rope_scaling=RopeScaling("llama3", 8.0), lora=LoRAConfig(targets=("q_proj",)))
  again = ModelConfig.from_dict(cfg.to_dict())
  assert again == cfg and hash(again) == hash(cfg)
