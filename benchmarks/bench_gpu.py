"""Absolute GPU figures: the DPO step (SmolLM2-135M and a 1B-class Llama, bf16) and generation tokens/s.

Needs a machine with an NVIDIA GPU and the `cuda` extra (``pip install -e '.[cuda]'``: jax[cuda12] of the
pinned jax version). Measures, in one run,

* the PRO policy stage's DPO step (`bench_dpo_step.build_pro_jax_step`: `policy_loss("dpo")` through
  `dpo_task` and the engine's `setup`, frozen reference, AdamW) in bf16 compute with fp32 params, for
  - SmolLM2-135M-Instruct (from its GGUF in $PRO_JAX_SHARED_DATA), full fine-tuning, and
  - a 1B-class Llama (Llama-3.2-1B's shape: d 2048, 16 layers, 32/8 heads, mlp 8192, vocab 128256,
    random weights), full fine-tuning;
  step time (median after warm-up) and MFU = model FLOPs (6NT policy + 2NT reference + attention, the
  formula of `pro_jax.train.flops.model_flops_per_step`) / time / the GPU's dense bf16 peak
  (`--peak-tflops`, else a table by device kind);
* `pro_jax.generate` on SmolLM2 (bf16), greedy, 128 new tokens, batch 1 and 16: tokens/s.

Results are appended to benchmarks/results/gpu_<date>.md with the device kind. Nothing in the tests
needs a GPU; ``--tiny --allow-cpu`` runs the same code on tiny shapes on a CPU (a smoke test of the
script, not a measurement).

    python benchmarks/bench_gpu.py                       # on a GPU machine
    python benchmarks/bench_gpu.py --tiny --allow-cpu    # smoke test anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_dpo_step as dpo  # noqa: E402  (the same harness as the CPU comparison)

# Dense bf16 peak TFLOP/s by `device_kind` substring (vendor datasheets, no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "V100": 125.0, "T4": 65.0}
LLAMA_1B = dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_dim=8192, vocab=128256)
TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128, vocab=512)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--batch", type=int, default=8, help="preference pairs per DPO step")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--gen-batches", default="1,16")
  p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: table)")
  p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test); SmolLM2 replaced by a tiny Llama")
  p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test only)")
  p.add_argument("--results-dir", default=str(HERE / "results"), help="'' = do not write a results file")
  return p.parse_args(argv)


def _peak(device, override: float | None) -> float | None:
  if override:
    return override * 1e12
  kind = getattr(device, "device_kind", "")
  for k, v in BF16_PEAK_TFLOPS.items():
    if k in kind:
      return v * 1e12
  return None


def _dpo_args(args, model: str, shape: dict) -> argparse.Namespace:
  a = dpo.parse_args([])
  a.model = model
  a.batch, a.seq_len, a.prompt_len = args.batch, args.seq_len, args.prompt_len
  for k, v in shape.items():
    setattr(a, k, v)
  return a


def dpo_row(args, name: str, model: str, shape: dict, workdir: Path, peak: float | None) -> dict:
  import jax
  from pro_jax.models import ModelConfig
  from pro_jax.train import flops as train_flops

  a = _dpo_args(args, model, shape)
  wdir = workdir / name.replace(" ", "_")
  mcfg = ModelConfig.from_dict(dpo.write_weights(a, wdir / "weights"))
  a.vocab = mcfg.vocab_size
  np.savez(wdir / "batch.npz", **dpo.make_batch(a))
  spec = {"batch_file": str(wdir / "batch.npz"), "weights_dir": str(wdir / "weights"), "model": mcfg.to_dict(),
          "steps": args.steps, "warmup": args.warmup, "lr": 1e-6, "beta": 0.1, "seed": 0, "dtype": "bfloat16",
          "response_window": args.seq_len - args.prompt_len}
  su, state, frozen, batch = dpo.build_pro_jax_step(spec)
  holder = {"state": state}

  def step():
    holder["state"], metrics = su.step(holder["state"], frozen, batch)
    return jax.block_until_ready(metrics)["loss"]

  times, losses = dpo._timings(step, args.warmup, args.steps)
  sec = statistics.median(times[args.warmup:])
  tokens = 2 * args.batch * args.seq_len
  flops = train_flops.model_flops_per_step(mcfg, tokens, args.seq_len, extra_forward_tokens=tokens)
  return {"name": name, "params_M": mcfg.num_params() / 1e6, "s_per_step": sec, "tokens_per_s": tokens / sec,
          "tflops_per_s": flops / sec / 1e12, "mfu": flops / sec / peak if peak else None,
          "loss_step1": losses[0], "first_step_s": times[0]}


def gen_rows(args, model_kind: str, shape: dict, workdir: Path) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from pro_jax.models.generate import generate
  from pro_jax.models.hf_io import load_hf_model

  a = _dpo_args(args, model_kind, shape)
  wdir = workdir / "gen_weights"
  if not wdir.exists():
    dpo.write_weights(a, wdir)
  model, params = load_hf_model(wdir, dtype="bfloat16", param_dtype="bfloat16")[:2]
  rows = []
  for B in [int(b) for b in args.gen_batches.split(",")]:
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (B, 64)), jnp.int32)

    def run():
      o = generate(model, params, prompt, None, max_new_tokens=args.new_tokens, greedy=True, eos_token_id=[],
                   return_logprobs=False)
      return jax.block_until_ready(o.tokens_BxN)

    run()
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    rows.append({"batch": B, "tokens_per_s": B * args.new_tokens / statistics.median(times)})
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not args.allow_cpu:
    raise SystemExit(f"no GPU: jax's default device is {dev.platform} ({dev.device_kind}); install the `cuda` "
                     "extra on a GPU machine, or pass --allow-cpu --tiny for a smoke test")
  if args.tiny:
    args.batch, args.seq_len, args.prompt_len, args.new_tokens = 2, 32, 8, 8
  peak = _peak(dev, args.peak_tflops)
  workdir = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
  small = ("random", TINY) if args.tiny else ("smollm2", {})
  rows = [dpo_row(args, "SmolLM2-135M" if not args.tiny else "tiny Llama", *small, workdir, peak),
          dpo_row(args, "Llama 1B-class (3.2-1B shape)" if not args.tiny else "tiny Llama (1B slot)", "random",
                  TINY if args.tiny else LLAMA_1B, workdir, peak)]
  gens = gen_rows(args, *small, workdir)
  header = (f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; bf16 peak "
            f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; DPO: {args.batch} pairs x {args.seq_len} "
            f"(prompt {args.prompt_len}), bf16 compute, fp32 params + AdamW, frozen reference; "
            f"{args.warmup} warm-up + {args.steps} steps, median" + ("; TINY SMOKE TEST, not a measurement"
                                                                     if args.tiny else ""))
  lines = ["| DPO step | params | s/step | tokens/s | TFLOP/s | MFU | loss step 1 |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    lines.append(f"| {r['name']} | {r['params_M']:.0f}M | {r['s_per_step']:.4f} | {r['tokens_per_s']:.0f} | "
                 f"{r['tflops_per_s']:.2f} | {mfu} | {r['loss_step1']:.6f} |")
  lines += ["", f"| generate ({'tiny' if args.tiny else 'SmolLM2-135M'}, bf16, greedy, {args.new_tokens} new) | "
            "tokens/s |", "|---|---|"]
  lines += [f"| batch {g['batch']} | {g['tokens_per_s']:.0f} |" for g in gens]
  report = header + "\n\n" + "\n".join(lines)
  print(report)
  if args.results_dir and not args.tiny:
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    with open(out / f"gpu_{stamp:%Y-%m-%d}.md", "a") as fh:
      fh.write(f"## {stamp:%Y-%m-%d %H:%M} UTC\n\n{report}\n\n")
  return {"rows": rows, "gen": gens, "device": dev.device_kind, "report": json.dumps(rows)}


if __name__ == "__main__":
  main()
