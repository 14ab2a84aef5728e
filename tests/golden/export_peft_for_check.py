"""Write pro_jax PEFT exports for the manual peft check (`make_peft_golden.py --check DIR`).

    .venv/bin/python tests/golden/export_peft_for_check.py DIR

For each PEFT fixture: the base fixture is loaded with pro_jax, LoRA params of our own are drawn
(a, b ~ N(0, 0.5^2), seed per case), exported with `save_peft_adapter` (base_model_name_or_path = the
base fixture's absolute path), and pro_jax's logits with those adapters (unmerged) go to ours.npz.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

from pro_jax.models import Transformer
from pro_jax.models.config import LoRAConfig
from pro_jax.models.hf_io import load_hf_model
from pro_jax.models.lora import init_lora
from pro_jax.models.peft_io import save_peft_adapter

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
CASES = {"llama_gqa_untied": LoRAConfig(rank=3, alpha=7.0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj")),
         "gpt2_lm": LoRAConfig(rank=2, alpha=4.0, targets=("c_attn", "c_proj"))}


def main(out: pathlib.Path) -> None:
  for k, (base, lcfg) in enumerate(CASES.items()):
    model, params = load_hf_model(FIXTURES / base)
    config = model.config.replace(lora=lcfg)
    lora = init_lora(Transformer(config), jax.random.key(k))
    lora = jax.tree.map(lambda x, i=k: 0.5 * jax.random.normal(jax.random.key(100 + i), x.shape, x.dtype), lora)
    d = save_peft_adapter(out / f"ours_{base}", config, lora, base_model_name_or_path=str(FIXTURES / base),
                          overwrite=True)
    golden = np.load(FIXTURES / base / "golden.npz")
    logits = Transformer(config).apply({"params": params, "lora": lora}, golden["tokens"], golden["mask"]).logits
    np.savez(d / "ours.npz", tokens=golden["tokens"], mask=golden["mask"], positions=golden["positions"],
             logits=np.asarray(logits))
    print(d)


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
