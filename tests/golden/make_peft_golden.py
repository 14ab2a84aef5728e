"""PEFT golden fixtures: LoRA adapters written by `peft` itself on two of the tiny transformers fixtures,
and the logits of the `PeftModel` (base + adapter, unmerged) on the base fixture's tokens.

NOT part of the test suite and NOT a dependency of pro_jax: it needs torch + transformers + peft, which
live in a separate virtual environment (e.g. /work/fixture-venv: torch 2.13.0, transformers 5.24.0,
peft 0.22.0). From the repository root:

    /work/fixture-venv/bin/python tests/golden/make_peft_golden.py     # writes tests/golden/fixtures/peft_*

Each `fixtures/peft_<base>/` holds what `PeftModel.save_pretrained` wrote (adapter_config.json,
adapter_model.safetensors; base_model_name_or_path set to the base fixture's directory name) and
golden.npz (the base fixture's tokens / mask / positions and the PeftModel's fp32 logits). Adapter
weights are drawn (lora_B too, which PEFT initialises to zero) at a scale that moves the logits by O(1),
so a wrong transpose, scale or target cannot hide. `tests/test_peft_export.py` checks pro_jax's
import (`load_peft_adapter`) against the logits and its export (`save_peft_adapter`) against the files.

Second mode, a manual check that peft loads pro_jax's exports (not in the suite):

    .venv/bin/python tests/golden/export_peft_for_check.py DIR     # pro_jax exports + ours.npz
    /work/fixture-venv/bin/python tests/golden/make_peft_golden.py --check DIR

loads every DIR/<name>/ (an adapter written by `pro_jax.save_peft_adapter` and ours.npz with pro_jax's
logits) with `PeftModel.from_pretrained` onto its base fixture and prints the max |logit difference|.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import peft
import torch
import transformers
from transformers import AutoModelForCausalLM

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

# name -> (base fixture, LoraConfig kwargs)
SPECS = {
    "peft_llama_gqa_untied": ("llama_gqa_untied", dict(
        r=4, lora_alpha=8, lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "peft_gpt2_lm": ("gpt2_lm", dict(r=2, lora_alpha=5, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                                     fan_in_fan_out=True)),
}


def _logits(model, golden) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(golden["tokens"], dtype=torch.long),
                attention_mask=torch.tensor(golden["mask"], dtype=torch.long),
                position_ids=torch.tensor(golden["positions"], dtype=torch.long))
  return out.logits.float().numpy()


def make(name: str) -> None:
  base_name, kwargs = SPECS[name]
  torch.manual_seed(sum(map(ord, name)))
  base = AutoModelForCausalLM.from_pretrained(FIXTURES / base_name, dtype=torch.float32, attn_implementation="eager")
  model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lora_A" in n or "lora_B" in n:
        p.copy_(torch.randn_like(p) * 0.5)
  model.eval()
  golden = dict(np.load(FIXTURES / base_name / "golden.npz"))
  out = FIXTURES / name
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out)
  cfg_file = out / "adapter_config.json"
  cfg = json.loads(cfg_file.read_text())
  cfg["base_model_name_or_path"] = base_name
  cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
  (out / "README.md").unlink(missing_ok=True)
  logits = _logits(model, golden)
  base_logits = golden["logits"]
  print(f"{name}: max |peft - base logits| = {np.abs(logits - base_logits).max():.3f} (the adapter matters)")
  np.savez_compressed(out / "golden.npz", tokens=golden["tokens"], mask=golden["mask"],
                      positions=golden["positions"], logits=logits)


def check(root: pathlib.Path) -> None:
  worst = 0.0
  for d in sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file()):
    cfg = json.loads((d / "adapter_config.json").read_text())
    base_dir = pathlib.Path(cfg["base_model_name_or_path"])
    if not base_dir.is_absolute() and not base_dir.exists():
      base_dir = FIXTURES / base_dir
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, d)
    model.eval()
    ours = np.load(d / "ours.npz")
    logits = _logits(model, ours)
    valid = ours["mask"].astype(bool)
    diff = float(np.abs(logits[valid] - ours["logits"][valid]).max())
    worst = max(worst, diff)
    print(f"{d.name}: peft {peft.__version__} loaded it onto {base_dir.name}; max |logit diff| vs pro_jax = {diff:.2e}")
  print(f"worst: {worst:.2e}")
  if worst > 1e-4:
    raise SystemExit("FAILED: difference above 1e-4")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--check", type=pathlib.Path, default=None)
  args = parser.parse_args()
  print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
  if args.check is not None:
    check(args.check)
    return
  for name in SPECS:
    make(name)


if __name__ == "__main__":
  main()
