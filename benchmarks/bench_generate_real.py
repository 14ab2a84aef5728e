"""Generation on a real model, side by side: `pro_jax.generate` vs transformers' `generate` (torch).

Both decode greedily from the same weights -- SmolLM2-135M-Instruct from its GGUF file, dequantized
by `pro_jax.load_gguf` and written once with `save_hf_model`, so transformers loads exactly the
same float32 tensors -- on the same chat-template prompts (left-padded), exactly ``--new-tokens``
new tokens per row (EOS never stops a row, so both do the same amount of work), at batch 1 and
batch 16, in fp32 and with bf16 weights / compute. Each framework runs in its own subprocess with the
same thread settings (``--threads``); the first call (compilation for pro_jax, warm-up for torch)
is excluded and the median of ``--repeats`` calls is reported. Tokens/s = batch x new tokens /
wall time of one generate call (prefill included). Greedy tokens are compared between the two in
fp32 (share of identical tokens up to the first disagreement).

    python benchmarks/bench_generate_real.py                           # batch 1 and 16, fp32 + bf16
    python benchmarks/bench_generate_real.py --batches 1 --new-tokens 16 --repeats 1 --dtypes float32

transformers runs from a separate venv (``--torch-python``; torch is never a pro_jax dependency):
one with ``torch==2.13.0`` (CPU wheel), ``transformers``, ``accelerate``, e.g.
``python3.11 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 transformers==5.24.0
accelerate``. The transformers side uses its default generation path (dynamic KV cache, SDPA
attention) in `torch.inference_mode`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import append_report, cpu_model, spawn_worker

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.",
    "Write a short poem about the sea.", "How do I sort a list in Python?",
    "What causes rain?", "Give me three tips for better sleep.", "Who wrote Hamlet?",
    "Describe a cat to someone who has never seen one.", "What is 17 times 23?",
    "Why is the sky blue?", "Suggest a name for a bakery.", "How does a bicycle stay upright?",
    "Summarize the plot of Cinderella.", "What is machine learning?", "List four primary colors.",
    "How do vaccines work?",
]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gguf", default=None, help="GGUF file (default: $PRO_JAX_SHARED_DATA/" + DEFAULT_GGUF + ")")
  p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
  p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3, help="timed generate calls per setting (median)")
  p.add_argument("--frameworks", default="pro_jax,transformers")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--torch-python", default="/work/trl-venv/bin/python")
  p.add_argument("--results-dir", default=str(HERE / "results"), help="'' = do not write a results file")
  p.add_argument("--timeout", type=float, default=1800.0)
  p.add_argument("--worker", choices=("pro_jax", "transformers"), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token rows to one length: tokens [B, P] int32, mask [B, P] int32."""
  P = max(len(r) for r in rows)
  tokens = np.full((len(rows), P), pad_id, np.int32)
  mask = np.zeros((len(rows), P), np.int32)
  for i, r in enumerate(rows):
    tokens[i, P - len(r):] = r
    mask[i, P - len(r):] = 1
  return tokens, mask


# ---------------------------------------------------------------------------------------------
# Workers


def _timed_runs(run, repeats: int, label: str) -> dict:
  """1 warm-up + `repeats` timed calls of `run()` (which returns the generated tokens)."""
  times, toks = [], None
  for _ in range(1 + repeats):
    t0 = time.perf_counter()
    toks = run()
    times.append(time.perf_counter() - t0)
  print(f"{label}: {times}", flush=True)
  return {"times": times, "tokens": toks.tolist()}


def worker_pro_jax(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from pro_jax.models.generate import generate
  from pro_jax.models.hf_io import load_hf_model

  out = {"version": f"pro_jax (jax {jax.__version__})", "runs": {}}
  for dtype in spec["dtypes"]:
    model, params = load_hf_model(spec["weights_dir"], dtype=dtype, param_dtype=dtype)[:2]
    params = jax.device_put(params)
    for B in spec["batches"]:
      tokens, mask = left_pad(spec["prompts"][:B], spec["pad_id"])
      tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

      def run():
        o = generate(model, params, tokens, mask, max_new_tokens=spec["new_tokens"], greedy=True,
                     eos_token_id=[], pad_token_id=spec["pad_id"], return_logprobs=False)
        return np.asarray(jax.block_until_ready(o.tokens_BxN))

      out["runs"][f"{dtype}/{B}"] = _timed_runs(run, spec["repeats"], f"pro_jax {dtype} B={B}")
  return out


def worker_transformers(spec: dict) -> dict:
  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(spec["threads"])
  out = {"version": f"transformers {transformers.__version__} (torch {torch.__version__})", "runs": {}}
  for dtype in spec["dtypes"]:
    model = AutoModelForCausalLM.from_pretrained(spec["weights_dir"], dtype=getattr(torch, dtype))
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early: exactly new_tokens per row
    for B in spec["batches"]:
      tokens, mask = left_pad(spec["prompts"][:B], spec["pad_id"])
      tokens, mask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

      def run():
        with torch.inference_mode():
          o = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=spec["new_tokens"],
                             min_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=spec["pad_id"],
                             eos_token_id=None)
        return o[:, tokens.shape[1]:].numpy()

      out["runs"][f"{dtype}/{B}"] = _timed_runs(run, spec["repeats"], f"transformers {dtype} B={B}")
  return out


WORKERS = {"pro_jax": worker_pro_jax, "transformers": worker_transformers}


def _spawn(python: str, worker: str, spec: dict, workdir: Path, threads: int, timeout: float) -> dict:
  return spawn_worker(__file__, python, worker, spec, workdir, threads, timeout)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
  """Share of tokens identical up to each row's first disagreement (greedy paths diverge for good)."""
  same = total = 0
  for ra, rb in zip(a, b):
    n = 0
    while n < len(ra) and ra[n] == rb[n]:
      n += 1
    same += n
    total += len(ra)
  return same / max(total, 1)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.worker:
    spec = json.loads(Path(args.spec).read_text())
    Path(spec["out"]).write_text(json.dumps(WORKERS[args.worker](spec)))
    return {}
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  gguf = args.gguf or os.path.join(os.environ.get("PRO_JAX_SHARED_DATA", "/work/shared/data"), DEFAULT_GGUF)
  if not Path(gguf).exists():
    raise SystemExit(f"--gguf: {gguf} not found")
  frameworks = [f for f in args.frameworks.split(",") if f]
  if "transformers" in frameworks and not Path(args.torch_python).exists():
    raise SystemExit(f"--torch-python {args.torch_python} not found (a venv with torch + transformers)")
  batches = [int(b) for b in args.batches.split(",")]
  if max(batches) > len(QUESTIONS):
    raise SystemExit(f"--batches: at most {len(QUESTIONS)} prompts")
  from pro_jax.models.gguf import load_gguf
  from pro_jax.models.hf_io import save_hf_model

  workdir = Path(tempfile.mkdtemp(prefix="bench_gen_"))
  model, params, tok = load_gguf(gguf)
  save_hf_model(workdir / "weights", model, params, overwrite=True)
  prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)) for q in QUESTIONS]
  pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
  spec = {"weights_dir": str(workdir / "weights"), "prompts": prompts, "pad_id": pad_id,
          "batches": batches, "dtypes": args.dtypes.split(","), "new_tokens": args.new_tokens,
          "repeats": args.repeats, "threads": args.threads}
  load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
  pythons = {"pro_jax": sys.executable, "transformers": args.torch_python}
  results = {}
  for f in frameworks:
    print(f"[bench] {f} ...", flush=True)
    results[f] = _spawn(pythons[f], f, spec, workdir, args.threads, args.timeout)
    if "error" in results[f]:
      print(results[f]["error"], flush=True)
  load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())

  N = args.new_tokens
  lines = ["| dtype | batch | " + " | ".join(f"{f} tokens/s" for f in frameworks) +
           " | pro_jax / transformers | greedy tokens identical |", "|---|---|" + "---|" * (len(frameworks) + 2)]
  table = {}
  for dtype in spec["dtypes"]:
    for B in batches:
      key = f"{dtype}/{B}"
      rates, toks = {}, {}
      for f in frameworks:
        r = results[f].get("runs", {}).get(key)
        if r:
          rates[f] = B * N / statistics.median(r["times"][1:])
          toks[f] = r["tokens"]
      ratio = rates["pro_jax"] / rates["transformers"] if len(rates) == 2 else float("nan")
      agree = _agreement(toks["pro_jax"], toks["transformers"]) if len(toks) == 2 else float("nan")
      table[key] = {"rates": rates, "ratio": ratio, "agreement": agree}
      lines.append(f"| {dtype} | {B} | " + " | ".join(f"{rates.get(f, float('nan')):.1f}" for f in frameworks) +
                   f" | {ratio:.2f}x | {100 * agree:.0f}% |")
  versions = ", ".join(results[f].get("version", "failed") for f in frameworks)
  header = (f"model: SmolLM2-135M-Instruct ({Path(gguf).name}, dequantized), greedy, {N} new tokens per row, "
            f"chat-template prompts (left-padded)\nCPU: {cpu_model()}, {os.cpu_count()} cores, threads "
            f"{args.threads}; load average before {load_before}, after {load_after}\n{versions}\n"
            f"1 warm-up + {args.repeats} timed generate calls per setting, median; prefill included")
  report = header + "\n\n" + "\n".join(lines)
  print("\n" + report)
  if args.results_dir:
    cmd = "python benchmarks/bench_generate_real.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = append_report(args.results_dir, "generate_real", cmd, header, lines)
    print(f"[bench] appended to {path}")
  return table


if __name__ == "__main__":
  main()
