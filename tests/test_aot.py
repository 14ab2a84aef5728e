"""`pro-jax aot`: compile the real train step for a TPU topology on this CPU host (needs libtpu).

Small model on a small topology to stay fast; the Llama-2-7B figures are in docs/training.md.
"""

import json

import pytest

from pro_jax import cli
from pro_jax.configs import load_config
from pro_jax.train.aot import COST_VARIANT, GIB, aot_compile, libtpu_available
from pro_jax.train.config import model_config_from

pytestmark = pytest.mark.skipif(
    not libtpu_available(),
    reason="libtpu is not installed: `pip install 'jax[tpu]==0.10.2'` to compile for TPU topologies on CPU")


def test_tiny_dpo_step_compiles_for_v5e_and_reports_memory_cost_and_mfu(monkeypatch):
  from pro_jax.models import transformer
  monkeypatch.setattr(transformer, "UNROLL_MAX_LAYERS", 0)  # scan even this shallow stack, as at 7B
  cfg = load_config("tiny_dpo")  # scanned layers: a loop, so the loop-free variant gives the cost figures
  r = aot_compile(cfg, "v5e:2x2")
  assert r.n_chips == 4 and r.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
  assert "v5" in r.device_kind.lower()
  assert r.hbm_bytes == 16 * GIB and r.fits
  assert 0 < r.argument_bytes < r.total_bytes < GIB
  assert r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes + r.code_bytes
  assert r.alias_bytes > 0  # the state is donated: outputs reuse its buffers
  m = model_config_from(cfg.model)
  tokens = 2 * cfg.batch_size * cfg.data.seq_len  # chosen + rejected
  assert r.model_flops == pytest.approx(4 * m.flops_per_token(cfg.data.seq_len) * tokens)  # 3F policy + F ref
  assert r.while_loops > 0 and r.cost_program == COST_VARIANT and r.cost_while_loops == 0
  assert r.optimal_seconds > 0 and r.cost_program_total_bytes > 0
  assert r.mfu == pytest.approx(r.model_flops / (r.optimal_seconds * 4 * 197e12))
  assert 0 < r.mfu < 1
  assert "FITS" in r.table()


def test_aot_command_exits_nonzero_when_the_step_does_not_fit(tmp_path, capsys):
  # ~4.3e9 parameters (two 1M x 4096 embeddings) + AdamW on 4 chips of 16 GiB: does not fit.
  args = ["aot", "--config", "tiny_lm", "--topology", "v5e:2x2", "--json", str(tmp_path / "r.json"),
          "--config.model.vocab_size=1048576", "--config.model.d_model=4096", "--config.model.n_heads=32",
          "--config.model.n_kv_heads=32", "--config.model.n_layers=1", "--config.model.mlp_dim=128",
          "--config.data.seq_len=16", "--config.batch_size=4"]
  assert cli.main(args) == 1
  captured = capsys.readouterr()
  assert "DOES NOT FIT" in captured.out and "more than the 16 GiB of HBM of v5e:2x2" in captured.err
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["fits"] is False and report["total_bytes"] > 16 * GIB
  assert "exceeds available HBM" in report["compile_error"]


def test_unknown_topology_is_a_clear_error(capsys):
  assert cli.main(["aot", "--config", "tiny_dpo", "--topology", "v9x:2x2"]) == 1
  assert "unknown TPU generation 'v9x'" in capsys.readouterr().err


def test_v4_topologies_count_tensorcores_with_half_a_chip_each():
  r = aot_compile(load_config("tiny_lm", ["--config.mesh.fsdp=-1"]), "v4:2x2x1", cost_variant=False)
  assert r.n_chips == 8 and "4 chips x 2 TensorCores" in r.device_kind
  assert r.hbm_bytes == 16 * GIB and r.fits
  assert r.mfu == pytest.approx(r.model_flops / (r.optimal_seconds * 8 * 275e12 / 2))
