"""Decode speed: `generate()` with its KV cache vs recomputing the whole sequence at every step.

Both run greedy decoding of the same random Llama-type model on the same left-padded prompts, in one
process, one after the other, each compiled first (compile time excluded) and timed over
``--repeats`` runs (median). The recompute baseline is itself one jitted `lax.fori_loop`: at step i
it runs the full forward over a fixed ``[B, P + N]`` buffer (slots not generated yet are masked and,
being in the future, invisible to the causal attention anyway) and takes the logits at slot
``P + i - 1``: static shapes, one compile, no host work per step. Both paths must emit the same
tokens (checked). Tokens/s counts generated tokens (batch x new tokens), prefill included.

    python benchmarks/bench_generate.py                       # d=256, 4 layers, B=8, P=64, N=128
    python benchmarks/bench_generate.py --d-model 512 --new-tokens 256 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.models.generate import generate


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--n-layers", type=int, default=4)
  p.add_argument("--n-heads", type=int, default=8)
  p.add_argument("--n-kv-heads", type=int, default=4)
  p.add_argument("--mlp-dim", type=int, default=688)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3, help="timed runs of the cached path (median)")
  p.add_argument("--recompute-repeats", type=int, default=1, help="timed runs of the recompute path")
  p.add_argument("--dtype", default="float32", help="compute dtype (float32 / bfloat16)")
  return p.parse_args(argv)


def make_recompute_fn(model: Transformer, n_new: int):
  """Greedy decoding without a cache: full forward over [B, P + N] at every step, in one jit."""

  @jax.jit
  def run(variables, prompt_BxP, prompt_mask_BxP):
    B, P = prompt_BxP.shape
    tokens_BxT = jnp.concatenate([prompt_BxP, jnp.zeros((B, n_new), jnp.int32)], axis=1)
    mask_BxT = jnp.concatenate([prompt_mask_BxP, jnp.zeros((B, n_new), jnp.int32)], axis=1)

    def step(i, carry):
      tokens_BxT, mask_BxT = carry
      logits_BxTxV = model.apply(variables, tokens_BxT, mask_BxT).logits
      next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BxTxV, P - 1 + i, axis=1, keepdims=False), -1)
      tokens_BxT = jax.lax.dynamic_update_slice_in_dim(tokens_BxT, next_B[:, None].astype(jnp.int32), P + i, 1)
      mask_BxT = jax.lax.dynamic_update_slice_in_dim(mask_BxT, jnp.ones((B, 1), jnp.int32), P + i, 1)
      return tokens_BxT, mask_BxT

    tokens_BxT, _ = jax.lax.fori_loop(0, n_new, step, (tokens_BxT, mask_BxT))
    return tokens_BxT[:, P:]

  return run


def timed(fn, repeats: int) -> tuple[float, float, object]:
  """(compile + first run seconds, median seconds of `repeats` further runs, last result)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times), out


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_kv_heads, mlp_dim=args.mlp_dim, max_seq_len=args.prompt_len + args.new_tokens,
                       dtype=args.dtype)
  model = Transformer(config)
  variables = jax.jit(functools.partial(init_variables, model))(jax.random.key(0))
  B, P, N = args.batch, args.prompt_len, args.new_tokens
  rs = np.random.RandomState(0)
  prompt = rs.randint(1, args.vocab, size=(B, P)).astype(np.int32)
  n_real = rs.randint(P // 2, P + 1, size=B)
  mask = (np.arange(P)[None, :] >= P - n_real[:, None]).astype(np.int32)
  prompt = jnp.asarray(prompt * mask)
  mask_j = jnp.asarray(mask)

  print(f"device: {jax.devices()[0].platform} x{jax.device_count()} | model: d={config.d_model} "
        f"layers={config.n_layers} heads={config.n_heads}/{config.kv_heads} mlp={config.mlp_dim} "
        f"vocab={config.vocab_size} dtype={config.dtype} | batch={B} prompt={P} new={N}")
  cached_first, cached_s, cached_out = timed(
      lambda: generate(model, variables, prompt, mask_j, max_new_tokens=N, greedy=True, eos_token_id=[],
                       return_logprobs=False).tokens_BxN, args.repeats)
  recompute = make_recompute_fn(model, N)
  recompute_first, recompute_s, recompute_out = timed(lambda: recompute(variables, prompt, mask_j),
                                                      args.recompute_repeats)
  same = float(np.mean(np.asarray(cached_out) == np.asarray(recompute_out)))
  rows = [("KV cache (generate)", cached_first, cached_s), ("recompute (full forward)", recompute_first, recompute_s)]
  print(f"{'method':<26} {'compile+1st s':>14} {'run s':>9} {'tokens/s':>10} {'ms/step':>9}")
  for name, first, secs in rows:
    print(f"{name:<26} {first:>14.2f} {secs:>9.3f} {B * N / secs:>10.0f} {1e3 * secs / N:>9.2f}")
  ratio = recompute_s / cached_s
  print(f"speed-up of the KV cache: {ratio:.1f}x  (same greedy tokens: {100 * same:.1f}%)")
  return {"cached_tokens_per_s": B * N / cached_s, "recompute_tokens_per_s": B * N / recompute_s,
          "ratio": ratio, "same_tokens": same}


if __name__ == "__main__":
  main()
