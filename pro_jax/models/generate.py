"""Batched autoregressive generation with a KV cache: one jitted prefill + `lax.while_loop` decode.

    out = generate(model, variables, prompt_tokens_BxP, prompt_mask_BxP, max_new_tokens=64,
                   rng=jax.random.key(0), temperature=0.7, top_p=0.9, eos_token_id=2)
    out.tokens_BxN, out.response_mask_BxN, out.logprobs_BxN, out.lengths_B, out.sequences_BxT

Prompts are LEFT-padded (mask 1 for real tokens), so every row's next token lands in the same cache
slot. The whole prompt is written into a KV cache of length ``P + max_new_tokens`` in one forward
pass, then one token per step is decoded at ``cache_index = P + i`` with the position each row would
have without padding (its count of real tokens so far). The loop stops as soon as every row has
emitted an EOS; finished rows keep emitting ``pad_token_id``. Everything after the argument checks
runs inside one jitted function (compiled once per model config, shapes and sampling settings), with
no host syncs; with sharded parameters under a mesh, jit propagates their shardings. Temperature,
top-p, the EOS ids and the pad id are traced: changing their values does not recompile.

Log-probabilities (``logprobs_BxN``) are those of each emitted token under the *tempered, untruncated*
distribution ``log_softmax(logits / temperature)`` -- after temperature, before top-k / top-p -- which
is what a PPO ratio against a recomputed ``log_softmax(logits / temperature)`` needs. With greedy
decoding (``greedy=True`` or ``temperature == 0``) the temperature used for them is the given one when
positive, else 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.models.config import ModelConfig
from pro_jax.models.transformer import (Block, Linear, Transformer, _dot, _norm, embed_tokens, init_cache,
                                        layer_context, positions_from_mask, softcap_logits)

Array = jax.Array


@flax.struct.dataclass
class GenerateOutput:
  """Result of :func:`generate`. N = max_new_tokens, T = P + N.

  Attributes:
    tokens_BxN: response tokens; ``pad_token_id`` after a row's EOS (and in steps never run).
    response_mask_BxN: 1 for every emitted response token up to and including the EOS, else 0.
    logprobs_BxN: float32 log-prob of each emitted token under log_softmax(logits / temperature)
      (before top-k / top-p); 0 where the mask is 0. None when ``return_logprobs=False``.
    lengths_B: number of response tokens per row (sum of the response mask, EOS included).
    sequences_BxT: ``concat(prompt_tokens, tokens)`` (left-padded prompt, then the response).
    sequence_mask_BxT: ``concat(prompt_mask, response_mask)``.
  """

  tokens_BxN: Array
  response_mask_BxN: Array
  logprobs_BxN: Array | None
  lengths_B: Array
  sequences_BxT: Array
  sequence_mask_BxT: Array


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Static (hashable) settings of one compiled generate function. Temperature, top-p, the EOS ids
  and the pad id are traced arguments, so changing their values does not recompile."""

  max_new_tokens: int
  greedy: bool = False
  top_k: int = 0
  use_top_p: bool = False
  return_logprobs: bool = True


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def _sample(logits_BxV: Array, rng: Array, temperature: Array | float, top_k: int, top_p: Array | float,
            greedy: bool, use_top_p: bool) -> tuple[Array, Array]:
  """Traceable core of `sample_logits`; `top_k`, `greedy`, `use_top_p` static, the rest may be traced."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  vocab = logits_BxV.shape[-1]
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled_BxV = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
  if greedy:
    tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  else:
    k = min(int(top_k), vocab) if top_k else vocab
    if k < vocab or use_top_p:
      vals_BxK, idx_BxK = jax.lax.top_k(scaled_BxV, k)  # sorted, highest first
      if use_top_p:
        probs_BxK = jax.nn.softmax(vals_BxK, axis=-1)
        mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
        keep_BxK = (mass_before_BxK < top_p).at[:, 0].set(True)
        vals_BxK = jnp.where(keep_BxK, vals_BxK, -jnp.inf)
      choice_B = jax.random.categorical(rng, vals_BxK, axis=-1)
      tokens_B = jnp.take_along_axis(idx_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
      tokens_B = jax.random.categorical(rng, scaled_BxV, axis=-1).astype(jnp.int32)
  logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BxV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, logprobs_B


def sample_logits(logits_BxV: Array, rng: Array | None, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, greedy: bool = False) -> tuple[Array, Array]:
  """Draw one token per row. Returns ``(tokens_B int32, logprobs_B float32)``.

  * ``greedy=True`` or ``temperature == 0``: argmax of the logits (``rng`` unused, may be None).
  * otherwise: sample from ``softmax(logits / temperature)`` restricted to
    - the ``top_k`` highest logits (exactly k candidates, ties broken by index; 0 = off), then
    - the smallest set of the highest-probability remaining candidates whose (renormalized) mass is
      >= ``top_p`` (1.0 = off); the most likely candidate is always kept.
  The returned log-prob is that of the chosen token under ``log_softmax(logits / temperature)``,
  before truncation (temperature 1 when it is 0). Settings are Python numbers.
  """
  _check_sampling(temperature, top_k, top_p)
  greedy = bool(greedy or temperature == 0)
  if not greedy and rng is None:
    raise ValueError("sampling (greedy=False, temperature > 0) needs an rng key")
  return _sample(logits_BxV, rng, temperature, int(top_k), top_p, greedy, top_p < 1.0)


def _as_variables(variables: Any) -> dict:
  if isinstance(variables, (dict, flax.core.FrozenDict)) and "params" in variables:
    return dict(variables)
  return {"params": variables}


def _unstack_layers(variables: dict, cache: dict, n_layers: int) -> tuple[list[dict], list[dict]]:
  """Split the layer-stacked variables ({col: {"layers": [n_layers, ...]}}) and the stacked KV cache
  ({"k", "v"}: [n_layers, B, T, K, hd]) into one tree per layer."""
  stacked = {col: tree["layers"] for col, tree in variables.items() if "layers" in tree}
  layer_vars = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layers)]
  layer_caches = [{"k": cache["k"][i], "v": cache["v"][i]} for i in range(n_layers)]
  return layer_vars, layer_caches


def _decode_step(config: ModelConfig, variables: dict, layer_vars: list[dict], caches: list[dict], tokens_Bx1: Array,
                 positions_Bx1: Array, cache_index: Array, cache_mask_BxT: Array) -> tuple[Array, list[dict]]:
  """One decode step: `Transformer.__call__` for one token per row (no soft weight tokens), with the
  layers unrolled over per-layer weights and per-layer caches. Returns (logits_BxV float32, caches).

  Why not `model.apply`: its layer loop indexes [n_layers, ...] stacks, and XLA:CPU materializes each
  layer's slice of the weights before every matmul (a copy of all layer weights per token, which
  doubles to triples the memory traffic of a bandwidth-bound decode step); with one array per layer
  the matmuls read the weights in place and each cache update is an in-place write."""
  params = variables["params"]
  dtype = config.jnp_dtype
  x_Bx1xD = embed_tokens(config, params["embed"], tokens_Bx1)
  if config.arch == "gpt2":
    x_Bx1xD = x_Bx1xD + jnp.take(params["wpe"], positions_Bx1, axis=0).astype(dtype)
  T = caches[0]["k"].shape[1]
  ctx, sliding_N = layer_context(config, positions_Bx1, cache_mask_BxT, 1, T, cache_index, cache_index)
  slidings = [None] * config.n_layers if sliding_N is None else [sliding_N[i] for i in range(config.n_layers)]
  block = Block(config)
  new_caches = []
  for lv, layer_cache, sliding in zip(layer_vars, caches, slidings):
    x_Bx1xD, c = block.apply(lv, x_Bx1xD, ctx, (layer_cache, sliding))
    new_caches.append(c)
  h_BxD = _norm(config, "final_norm").apply({"params": params["final_norm"]}, x_Bx1xD)[:, 0]
  if config.tie_embeddings:
    logits_BxV = _dot(h_BxD, params["embed"].astype(dtype).T, out_dtype=jnp.float32)
  else:
    lm_head = Linear(config.vocab_size, (None, None), config)
    head_vars = {"params": params["lm_head"]}
    if "lm_head" in variables.get("lora", {}):
      head_vars["lora"] = variables["lora"]["lm_head"]
    logits_BxV = lm_head.apply(head_vars, h_BxD).astype(jnp.float32)
  logits_BxV = softcap_logits(config, logits_BxV)
  return logits_BxV, new_caches


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def _generate_jit(config: ModelConfig, settings: SamplingSettings, variables: dict, prompt_BxP: Array,
                  prompt_mask_BxP: Array, rng: Array, temperature: Array, top_p: Array, eos_E: Array,
                  pad_id: Array, weights_BxK: Array | None = None) -> GenerateOutput:
  s = settings
  model = Transformer(config)
  B, P = prompt_BxP.shape
  N = s.max_new_tokens
  T = P + N
  prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
  # Slots after the prompt always hold real tokens once written; causality hides unwritten ones.
  cache_mask_BxT = jnp.concatenate([prompt_mask_BxP, jnp.ones((B, N), jnp.int32)], axis=1)
  n_real_B = jnp.sum(prompt_mask_BxP, axis=1)

  def is_eos(tok_B):  # eos_E is padded with -1, which never matches a token
    return jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)

  def sample(logits_BxV, i):
    return _sample(logits_BxV, jax.random.fold_in(rng, i), temperature, s.top_k, top_p, s.greedy, s.use_top_p)

  # Prefill: the whole prompt at slots [0, P).
  cache = init_cache(config, B, T)
  out = model.apply(variables, prompt_BxP, prompt_mask_BxP, positions_from_mask(prompt_mask_BxP),
                    cache=cache, cache_index=0, cache_mask_BxT=cache_mask_BxT, weights_BxK=weights_BxK)
  tok_B, lp_B = sample(out.logits[:, -1], 0)
  tokens_BxN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok_B)
  logprobs_BxN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp_B)
  mask_BxN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(1)
  done_B = is_eos(tok_B)

  # Decode with per-layer weights and caches (see `_decode_step`): split once here, outside the loop.
  layer_vars, layer_caches = _unstack_layers(variables, out.cache, config.n_layers)

  def cond(state):
    i, _, _, _, _, done_B = state
    return (i < N) & ~jnp.all(done_B)

  def body(state):
    i, caches, tokens_BxN, logprobs_BxN, mask_BxN, done_B = state
    # Feed response token i - 1 at slot P + i - 1 (position = real tokens before it).
    prev_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxN, i - 1, 1, axis=1)
    pos_Bx1 = (n_real_B + i - 1)[:, None]
    logits_BxV, caches = _decode_step(config, variables, layer_vars, caches, prev_Bx1, pos_Bx1, P + i - 1,
                                      cache_mask_BxT)
    tok_B, lp_B = sample(logits_BxV, i)
    tok_B = jnp.where(done_B, pad_id, tok_B)
    lp_B = jnp.where(done_B, 0.0, lp_B)
    live_B = (~done_B).astype(jnp.int32)
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, tok_B[:, None], i, axis=1)
    logprobs_BxN = jax.lax.dynamic_update_slice_in_dim(logprobs_BxN, lp_B[:, None], i, axis=1)
    mask_BxN = jax.lax.dynamic_update_slice_in_dim(mask_BxN, live_B[:, None], i, axis=1)
    done_B = done_B | is_eos(tok_B)
    return i + 1, caches, tokens_BxN, logprobs_BxN, mask_BxN, done_B

  state = (jnp.asarray(1, jnp.int32), layer_caches, tokens_BxN, logprobs_BxN, mask_BxN, done_B)
  _, _, tokens_BxN, logprobs_BxN, mask_BxN, _ = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(
      tokens_BxN=tokens_BxN,
      response_mask_BxN=mask_BxN,
      logprobs_BxN=logprobs_BxN if s.return_logprobs else None,
      lengths_B=jnp.sum(mask_BxN, axis=1),
      sequences_BxT=jnp.concatenate([prompt_BxP.astype(jnp.int32), tokens_BxN], axis=1),
      sequence_mask_BxT=jnp.concatenate([prompt_mask_BxP, mask_BxN], axis=1),
  )


def _check_prompt_mask(mask: np.ndarray) -> None:
  """Host-side checks of a concrete prompt mask: left padding, at least one real token per row."""
  m = np.asarray(mask).astype(bool)
  empty = np.flatnonzero(~m.any(axis=1))
  if empty.size:
    raise ValueError(f"prompt_mask_BxP: row {int(empty[0])} has no real token (every prompt needs at "
                     "least one, e.g. BOS)")
  bad = np.flatnonzero((m[:, :-1] & ~m[:, 1:]).any(axis=1))
  if bad.size:
    raise ValueError(f"prompt_mask_BxP: row {int(bad[0])} is not left-padded (a real token is followed "
                     "by padding); generate() needs left-padded prompts")


def generate(model: Transformer, variables: Any, prompt_tokens_BxP: Any, prompt_mask_BxP: Any = None, *,
             max_new_tokens: int, rng: Array | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int = 0, return_logprobs: bool = True,
             weights_BxK: Any = None) -> GenerateOutput:
  """Generate up to ``max_new_tokens`` tokens after each (left-padded) prompt.

  Args:
    model: a `Transformer` with ``config.head == "lm"`` (its ``deterministic`` flag is ignored:
      generation never uses dropout).
    variables: ``{"params": ..., ["lora": ...]}`` or a bare params tree.
    prompt_tokens_BxP: int tokens, left-padded.
    prompt_mask_BxP: 1 for real tokens, 0 for (left) padding; None = all real. When it is a numpy
      array or list it is checked on the host (left padding, a real token in every row); a jax array
      is not checked (no device sync).
    max_new_tokens: N, the response length (static).
    rng: PRNG key; required unless decoding greedily. Step i uses ``fold_in(rng, i)``.
    temperature, top_k, top_p, greedy: see :func:`sample_logits`.
    eos_token_id: int or list of ints that end a row (the EOS is part of the response); None = the
      model config's ``eos_token_id`` (no stop if that is None too); ``[]`` = never stop.
    pad_token_id: written after a row's EOS.
    return_logprobs: whether to return ``logprobs_BxN``.
    weights_BxK: objective weights for a model with soft weight tokens (``config.weight_tokens``);
      they condition the prompt's weight-token slots (prefill).

  Returns:
    A `GenerateOutput`.
  """
  config = model.config
  if config.head != "lm":
    raise ValueError(f"generate() needs a model with an LM head, got head={config.head!r}")
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
  _check_sampling(temperature, top_k, top_p)
  if not (greedy or temperature == 0) and rng is None:
    raise ValueError("generate(): sampling (greedy=False, temperature > 0) needs rng=jax.random.key(...)")
  if eos_token_id is None:
    eos_token_id = config.eos_token_id
  eos = () if eos_token_id is None else (
      (int(eos_token_id),) if np.ndim(eos_token_id) == 0 else tuple(int(e) for e in eos_token_id))
  for e in eos:
    if not 0 <= e < config.vocab_size:
      raise ValueError(f"eos_token_id {e} is outside the vocabulary [0, {config.vocab_size})")

  variables = _as_variables(variables)
  if config.lora is not None and "lora" not in variables:
    raise ValueError("the model config has LoRA adapters: pass variables={'params': ..., 'lora': ...}")

  if not isinstance(prompt_tokens_BxP, jax.Array):
    prompt_tokens_BxP = np.asarray(prompt_tokens_BxP)
  if prompt_tokens_BxP.ndim != 2:
    raise ValueError(f"prompt_tokens_BxP must be [batch, length], got shape {prompt_tokens_BxP.shape}")
  B, P = prompt_tokens_BxP.shape
  if prompt_mask_BxP is None:
    prompt_mask_BxP = np.ones((B, P), np.int32)
  elif not isinstance(prompt_mask_BxP, jax.Array):
    prompt_mask_BxP = np.asarray(prompt_mask_BxP)
    _check_prompt_mask(prompt_mask_BxP)
  if tuple(prompt_mask_BxP.shape) != (B, P):
    raise ValueError(f"prompt_mask_BxP shape {tuple(prompt_mask_BxP.shape)} != prompt_tokens_BxP shape {(B, P)}")
  if config.arch == "gpt2" and P + max_new_tokens > config.max_seq_len:
    raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the model's "
                     f"max_seq_len {config.max_seq_len} (GPT-2 learned positions)")

  if config.weight_tokens and weights_BxK is None:
    raise ValueError("this model has soft weight tokens: pass weights_BxK=[B, K] objective weights")
  if weights_BxK is not None and tuple(np.shape(weights_BxK)) != (B, config.num_weights):
    raise ValueError(f"weights_BxK has shape {tuple(np.shape(weights_BxK))}, expected {(B, config.num_weights)}")
  greedy = bool(greedy or temperature == 0)
  settings = SamplingSettings(
      max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=int(top_k), use_top_p=top_p < 1.0,
      return_logprobs=bool(return_logprobs))
  if rng is None:
    rng = jax.random.key(0)  # unused by greedy decoding
  return _generate_jit(config, settings, variables, jnp.asarray(prompt_tokens_BxP, jnp.int32),
                       jnp.asarray(prompt_mask_BxP, jnp.int32), rng, jnp.float32(temperature),
                       jnp.float32(top_p), jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(pad_token_id),
                       None if weights_BxK is None else jnp.asarray(weights_BxK, jnp.float32))
