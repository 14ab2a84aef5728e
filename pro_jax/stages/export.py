"""`pro-jax export`: a trained PRO policy as a Hugging Face model or a PEFT LoRA adapter, with its
tokenizer and a model card, optionally pushed to the Hub.

    pro-jax export --workdir W/policy --out DIR [--merged | --peft] [--push-to-hub ORG/NAME]

* ``--merged`` (default): `save_hf_model` with the LoRA adapters (if any) folded in: config.json,
  safetensors, tokenizer files; `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it.
* ``--peft``: a LoRA run's adapters as ``adapter_config.json`` + ``adapter_model.safetensors``
  (`pro_jax.models.peft_io.save_peft_adapter`), loaded by ``peft.PeftModel.from_pretrained(base, DIR)``.
  The base is ``--base-model`` when given, else the run's ``hf:`` init source (a Hub id or a
  directory) when the policy started from one, else the run's own base weights, written as a
  transformers model to ``DIR/base`` (``base_model_name_or_path`` is then that directory).

Both write ``README.md``: the objectives, the reward normalization, the training loss and weights
source, and how to condition the policy (the weight text appended to the last user turn, exactly as
in training, for a RiC-style policy). Policies conditioned on soft weight tokens cannot be exported:
their weight embeddings have no transformers equivalent.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from typing import Any

import numpy as np

from pro_jax.models.heads import head_to_params
from pro_jax.models.hf_io import save_hf_model
from pro_jax.models.hub import check_repo_id, is_hub_id, push_to_hub
from pro_jax.models.lora import merged_config
from pro_jax.models.peft_io import save_peft_adapter
from pro_jax.models.tokenizer import load_tokenizer
from pro_jax.pro.weights import format_weights_text
from pro_jax.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

MODES = ("merged", "peft")


class ExportError(ValueError):
  """A run that cannot be exported as asked (the message says why and what to do)."""


def _pro(ck: Any) -> dict:
  try:
    return dict(ck.config.pro)
  except (AttributeError, KeyError, TypeError):
    return {}


def _tokenizer(ck: Any, override: str | None) -> Any:
  path = override or ck.extra.get("tokenizer")
  if not path:
    raise ExportError(f"{ck.directory}: the run records no tokenizer; pass --tokenizer DIR_OR_HUB_ID")
  try:
    return load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise ExportError(f"{ck.directory}: cannot load the run's tokenizer {path} ({e}); pass --tokenizer") from e


def _base_source(ck: Any) -> str | None:
  """The run's init source when it is a Hugging Face model (``hf:ORG/NAME`` or ``hf:DIR``)."""
  init = str(_pro(ck).get("init", ""))
  if not init.startswith("hf:"):
    return None
  src = init[3:]
  return src if is_hub_id(src) else os.path.abspath(src)


def model_card(ck: Any, *, mode: str, base_model: str | None = None) -> str:
  """README.md for an exported PRO policy (objectives, normalization, how to condition)."""
  extra = ck.extra or {}
  objectives = list(extra.get("objectives") or [])
  loss = extra.get("loss", "?")
  conditioning = extra.get("conditioning", "none")
  decimals = int(extra.get("decimals", 1))
  pro = _pro(ck)
  lines = ["---", "library_name: " + ("peft" if mode == "peft" else "transformers"), "tags:", "- pro-jax",
           "- multi-objective-alignment"]
  if base_model and mode == "peft":
    lines.append(f"base_model: {base_model}")
  lines += ["---", "", f"# PRO policy ({loss})", "",
            "Trained with pro-jax (PRO, prompt-aware multi-objective alignment): a preference "
            "adapter infers per-prompt weights over the objectives and the policy was trained with them.", "",
            "| | |", "|---|---|",
            f"| objectives (K = {len(objectives)}) | {', '.join(objectives) or '?'} |",
            f"| training loss | `{loss}` |",
            f"| weights during training | `{extra.get('weights_source', '?')}` |",
            f"| initialised from | `{pro.get('init', '?')}` |",
            f"| steps | {ck.step} |",
            f"| export | {'PEFT LoRA adapter' if mode == 'peft' else 'merged transformers model'} |", ""]
  norm = extra.get("norm")
  if norm:
    lines += ["## Reward normalization", "",
              f"Rewards were normalized per objective with `{norm.get('method')}` (r~ = (r - loc) / (scale + "
              f"{norm.get('eps', 0)})) before they set the weights and the training signal:", "",
              "| objective | loc | scale |", "|---|---|---|"]
    for name, loc, scale in zip(norm.get("objectives", objectives), norm.get("loc", []), norm.get("scale", [])):
      lines.append(f"| {name} | {loc:.6g} | {scale:.6g} |")
    lines.append("")
  lines += ["## How to condition", ""]
  if conditioning == "text" and objectives:
    example = format_weights_text(np.full(len(objectives), 1.0 / len(objectives)), objectives, decimals)
    lines += ["This is a weight-conditioned (RiC-style) policy: append the objective weights (non-negative, "
              f"summing to 1, {decimals} decimal(s)) to the **last user turn**, separated by one space, exactly as "
              "in training:", "", "```text", f"<user message> {example}", "```", "",
              "PRO's own per-prompt weights come from the run's preference adapter: "
              "`pro_jax.load_pro(W).weights(prompts)` or `pro-jax generate --workdir W --prompt ...` "
              "(`--weights` to set them yourself)."]
  elif conditioning == "soft":
    lines += ["Soft weight tokens: not representable in transformers (this export should not exist)."]
  else:
    lines += ["This policy takes no weights at inference: the per-prompt weights shaped its training "
              "data / loss. Prompt it as you would the base model."]
  lines += [""]
  if mode == "peft":
    lines += ["## Loading", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "from peft import PeftModel", f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
              "model = PeftModel.from_pretrained(base, \"THIS_DIR_OR_REPO\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIR_OR_REPO\")", "```", ""]
  else:
    lines += ["## Loading", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR_OR_REPO\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIR_OR_REPO\")", "```", ""]
  return "\n".join(lines)


def export_run(workdir: str | os.PathLike, out: str | os.PathLike, *, mode: str = "merged",
               base_model: str | None = None, tokenizer: str | None = None, dtype: str | None = None,
               overwrite: bool = False, push_to: str | None = None, api: Any = None) -> pathlib.Path:
  """Export the policy run in `workdir` to `out` (see the module docstring); returns `out`.

  push_to: a Hub repository ``ORG/NAME`` to upload `out` to (`pro_jax.models.hub.push_to_hub`,
  through `api`, default ``huggingface_hub.HfApi()``).
  """
  if mode not in MODES:
    raise ExportError(f"mode must be one of {MODES}, got {mode!r}")
  if push_to is not None:
    check_repo_id(push_to)  # before any work
  out = pathlib.Path(out)
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ExportError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")
  ck = load_checkpoint(workdir)
  cfg = ck.model_config
  if cfg is None:
    raise ExportError(f"{workdir}: the run holds no transformer (an adapter run?); export a policy run")
  if cfg.weight_tokens:
    raise ExportError(f"{workdir}: the policy is conditioned on soft weight tokens (weight_embed), which "
                      "transformers cannot represent; train with policy.pro.conditioning_mode=text to export")
  tok = _tokenizer(ck, tokenizer)
  variables = head_to_params(ck.variables, "value_head")  # a LoRA PPO run trains its value head with the adapters
  lora = variables.get("lora") or None
  params = variables["params"]
  if cfg.value_head:  # the critic has no transformers equivalent; the policy is exported without it
    params = {k: v for k, v in params.items() if k != "value_head"}
    cfg = cfg.replace(value_head=False)
  if lora is None:
    cfg = cfg.replace(lora=None)
  if mode == "peft":
    if not lora or cfg.lora is None:
      raise ExportError(f"{workdir}: the run trained all parameters (no LoRA adapters); use --merged")
    if cfg.head != "lm":
      raise ExportError(f"{workdir}: only causal LM policies export as PEFT adapters (head={cfg.head!r})")
    base_dir = None
    if base_model is None:
      base_model = _base_source(ck)
    if base_model is None:
      base_dir = out.parent / f".{out.name}.base-tmp"
      shutil.rmtree(base_dir, ignore_errors=True)
      save_hf_model(base_dir, merged_config(cfg), params, tokenizer=tok, dtype=dtype)
      base_model = str((out / "base").resolve())
    card = model_card(ck, mode="peft", base_model=base_model)
    save_peft_adapter(out, cfg, lora, base_model_name_or_path=base_model, dtype=dtype, overwrite=overwrite,
                      extra_files={"README.md": card})
    tok.save_pretrained(str(out))
    if base_dir is not None:
      os.replace(base_dir, out / "base")
  else:
    save_hf_model(out, cfg, params, lora=lora, tokenizer=tok, dtype=dtype, overwrite=overwrite)
    (out / "README.md").write_text(model_card(ck, mode="merged"))
  (out / "pro_jax_export.json").write_text(json.dumps(
      {"workdir": str(workdir), "step": ck.step, "mode": mode, "objectives": ck.extra.get("objectives"),
       "conditioning": ck.extra.get("conditioning"), "decimals": ck.extra.get("decimals"),
       "norm": ck.extra.get("norm"), "base_model": base_model if mode == "peft" else None}, indent=2) + "\n")
  log.info("exported %s (%s) to %s", workdir, mode, out)
  if push_to:
    push_to_hub(out, push_to, api=api)
    log.info("pushed %s to hf:%s", out, push_to)
  return out
