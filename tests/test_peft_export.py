"""PEFT LoRA adapters: pro_jax's import reproduces peft's PeftModel logits, and pro_jax's export
reproduces the adapter files peft itself wrote (tests/golden/make_peft_golden.py, peft 0.22)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from safetensors import safe_open

from pro_jax.models import Transformer
from pro_jax.models.hf_io import CheckpointError, load_hf_model
from pro_jax.models.peft_io import load_peft_adapter, save_peft_adapter

FIXTURES = pathlib.Path(__file__).parent / "golden" / "fixtures"
CASES = {"peft_llama_gqa_untied": "llama_gqa_untied", "peft_gpt2_lm": "gpt2_lm"}
# the fields of adapter_config.json that decide what peft builds
KEYS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
        "use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern", "lora_bias")


def _tensors(file):
  with safe_open(str(file), framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_matches_peft_logits(name):
  model, params = load_hf_model(FIXTURES / CASES[name])
  config, lora = load_peft_adapter(FIXTURES / name, model.config)
  golden = np.load(FIXTURES / name / "golden.npz")
  logits = np.asarray(Transformer(config).apply({"params": params, "lora": lora}, golden["tokens"],
                                                golden["mask"]).logits)
  valid = golden["mask"].astype(bool)
  assert np.abs(logits[valid] - golden["logits"][valid]).max() < 1e-4
  base = np.load(FIXTURES / CASES[name] / "golden.npz")["logits"]
  assert np.abs(base[valid] - golden["logits"][valid]).max() > 1.0  # the adapter does change the logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_reproduces_peft_files(name, tmp_path):
  model, _ = load_hf_model(FIXTURES / CASES[name])
  config, lora = load_peft_adapter(FIXTURES / name, model.config)
  out = save_peft_adapter(tmp_path / "adapter", config, lora, base_model_name_or_path=CASES[name])
  ours = json.loads((out / "adapter_config.json").read_text())
  ref = json.loads((FIXTURES / name / "adapter_config.json").read_text())
  assert {k: ours.get(k) for k in KEYS} == {k: ref.get(k) for k in KEYS}
  assert sorted(ours["target_modules"]) == sorted(ref["target_modules"])
  assert ours["base_model_name_or_path"] == ref["base_model_name_or_path"]
  got, want = _tensors(out / "adapter_model.safetensors"), _tensors(FIXTURES / name / "adapter_model.safetensors")
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_export_refuses_a_model_without_lora_and_a_nonempty_dir(tmp_path):
  model, _ = load_hf_model(FIXTURES / "llama_gqa_untied")
  with pytest.raises(CheckpointError, match="no LoRAConfig"):
    save_peft_adapter(tmp_path / "a", model.config, {}, base_model_name_or_path="x")
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "keep").write_text("x")
  config, lora = load_peft_adapter(FIXTURES / "peft_llama_gqa_untied", model.config)
  with pytest.raises(CheckpointError, match="not empty"):
    save_peft_adapter(tmp_path / "b", config, lora, base_model_name_or_path="x")
  assert (tmp_path / "b" / "keep").read_text() == "x"


def test_import_refuses_unsupported_peft_options(tmp_path):
  import shutil
  model, _ = load_hf_model(FIXTURES / "llama_gqa_untied")
  d = tmp_path / "dora"
  shutil.copytree(FIXTURES / "peft_llama_gqa_untied", d)
  cfg = json.loads((d / "adapter_config.json").read_text())
  cfg["use_dora"] = True
  (d / "adapter_config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="adapter_config.json: use_dora=True"):
    load_peft_adapter(d, model.config)
