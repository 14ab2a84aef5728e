"""Non-finite or nonsensical weights are refused at import, with the file and tensor / field named."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from pro_jax import sharding as sh
from pro_jax.models.hf_io import CheckpointError, load_hf_model
from pro_jax.models.llama2c import Llama2cError, _layout, load_llama2c

FIXTURE = pathlib.Path(__file__).resolve().parent / "golden" / "fixtures" / "llama_gqa_untied"


def _copy(tmp_path):
  return pathlib.Path(shutil.copytree(FIXTURE, tmp_path / "ckpt"))


def _rewrite_config(d, **fields):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(fields)
  (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("on_mesh", [False, True])
def test_nonfinite_safetensors_tensor_is_refused(tmp_path, value, on_mesh):
  d = _copy(tmp_path)
  (f,) = d.glob("*.safetensors")
  with safe_open(str(f), framework="np") as h:
    tensors = {k: h.get_tensor(k) for k in h.keys()}
  name = "model.layers.1.self_attn.q_proj.weight"
  tensors[name] = tensors[name].copy()
  tensors[name][3, 2] = value
  save_file(tensors, str(f), metadata={"format": "pt"})
  mesh = sh.make_mesh(1, 2, 1, devices=jax.devices()[:2]) if on_mesh else None
  with pytest.raises(CheckpointError, match=rf"{f}: tensor {name} holds NaN / inf values"):
    load_hf_model(d, mesh=mesh)


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 0, "field 'num_attention_heads' must be a positive integer, got 0"),
    ("num_hidden_layers", "two", "field 'num_hidden_layers' must be a positive integer, got 'two'"),
    ("hidden_size", 64.5, "field 'hidden_size' must be a positive integer, got 64.5"),
    ("num_key_value_heads", -2, "field 'num_key_value_heads' must be a positive integer, got -2"),
    ("rms_norm_eps", float("nan"), "field 'rms_norm_eps' must be a positive finite number, got nan"),
])
def test_nonsensical_config_field_is_refused_naming_file_and_field(tmp_path, field, value, message):
  d = _copy(tmp_path)
  _rewrite_config(d, **{field: value})
  with pytest.raises(CheckpointError) as e:  # was: ZeroDivisionError / "invalid literal for int()"
    load_hf_model(d)
  assert str(e.value) == f"{d / 'config.json'}: {message}"


def _write_llama2c(path, poison: str | None):
  h = dict(dim=8, hidden_dim=16, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=32, seq_len=16, shared_classifier=True)
  rng = np.random.default_rng(0)
  arrays = {name: rng.normal(size=shape).astype("<f4") * 0.1 for name, shape in _layout(h).items()}
  if poison:
    arrays[poison].reshape(-1)[5] = np.nan
  header = np.array([8, 16, 2, 2, 2, 32, 16], "<i4")
  path.write_bytes(header.tobytes() + b"".join(a.tobytes() for a in arrays.values()))


def test_nonfinite_llama2c_tensor_is_refused(tmp_path):
  good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
  _write_llama2c(good, None)
  model, params, _ = load_llama2c(good)
  assert model.config.n_layers == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  _write_llama2c(bad, "w2")
  with pytest.raises(Llama2cError, match=rf"{bad}: tensor w2 holds NaN / inf values \(first at index \[0, 0, 5\]\)"):
    load_llama2c(bad)
