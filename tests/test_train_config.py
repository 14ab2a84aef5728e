"""Configs: loading, overrides with did-you-mean, type checks, validation before compiling; the optimizer
schedule; the mesh / multi-host helpers."""

import math
import os

import jax
import ml_collections as mc
import numpy as np
import pytest

from pro_jax import sharding as shd
from pro_jax.configs import ConfigError, apply_overrides, list_configs, load_config
from pro_jax.configs.base import base_config
from pro_jax.models import LoRAConfig
from pro_jax.train.config import model_config_from, validate_config
from pro_jax.train.optimizer import make_schedule


def test_configs_load_by_name_and_by_path(tmp_path):
  assert {"tiny_lm", "tiny_dpo", "llama2_7b_dpo"} <= set(list_configs())
  cfg = load_config("llama2_7b_dpo")
  m = model_config_from(cfg.model)
  assert (m.d_model, m.n_layers, m.n_heads, m.mlp_dim, m.vocab_size) == (4096, 32, 32, 11008, 32000)
  assert m.num_params() == 6_738_415_616  # Llama-2-7B
  path = tmp_path / "my_config.py"
  path.write_text("from pro_jax.configs.base import base_config\n"
                  "def get_config(arg=None):\n"
                  "  c = base_config()\n"
                  "  c.optim.lr = float(arg) if arg else 0.5\n"
                  "  return c\n")
  assert load_config(str(path)).optim.lr == 0.5
  assert load_config(f"{path}:0.25").optim.lr == 0.25
  with pytest.raises(ConfigError, match="unknown config 'tiny_lmm'.*did you mean tiny_lm"):
    load_config("tiny_lmm")


def test_config_file_with_a_mistyped_key_fails_naming_it(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from pro_jax.configs.base import base_config\n"
                  "def get_config():\n"
                  "  c = base_config()\n"
                  "  c.optim.warmup_stpes = 3\n"
                  "  return c\n")
  with pytest.raises(ConfigError, match='warmup_stpes.*Did you mean "warmup_steps"'):
    load_config(str(path))


def test_overrides_typed_and_with_suggestions():
  cfg = load_config("tiny_lm", ["--config.optim.lr=1e-5", "--config.total_steps", "7",
                                "--config.log.tensorboard=false", "--config.model.lora.targets=q_proj,up_proj",
                                "--config.model.n_kv_heads=4", "--config.model.lora.alpha=8"])
  assert cfg.optim.lr == 1e-5 and cfg.total_steps == 7 and cfg.log.tensorboard is False
  assert cfg.model.lora.targets == ("q_proj", "up_proj") and cfg.model.n_kv_heads == 4
  assert isinstance(cfg.model.lora.alpha, float) and cfg.model.lora.alpha == 8.0
  with pytest.raises(ConfigError, match=r"unknown key optim.lrr; did you mean optim.lr\?"):
    load_config("tiny_lm", ["--config.optim.lrr=1"])
  with pytest.raises(ConfigError) as e:  # every problem at once
    load_config("tiny_lm", ["--config.total_steps=1.5", "--config.optim.lr=fast", "--config.log.tensorboard=maybe",
                            "--config.mesh=2", "--config.nosuch.key=1"])
  msg = str(e.value)
  assert "total_steps: expected an int, got '1.5'" in msg
  assert "optim.lr: expected a float, got 'fast'" in msg
  assert "log.tensorboard: expected a bool" in msg
  assert "mesh is a section" in msg
  assert "unknown key nosuch.key" in msg
  with pytest.raises(ConfigError, match="unrecognized argument 'oops'"):
    apply_overrides(base_config(), ["oops"])


def test_model_config_from_section():
  cfg = base_config()
  assert model_config_from(cfg.model).lora is None  # rank 0 = no LoRA
  cfg.model.lora.rank = 4
  assert model_config_from(cfg.model).lora == LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"))
  cfg.model.d_model = 30  # not divisible by n_heads=4
  with pytest.raises(ConfigError, match="model: d_model=30 not divisible by n_heads=4"):
    model_config_from(cfg.model)


@pytest.mark.parametrize("overrides, message", [
    (["--config.batch_size=12", "--config.mesh.data=2", "--config.mesh.fsdp=4"],
     "batch_size=12 is not divisible by the data-parallel size data x fsdp = 2 x 4 = 8"),
    (["--config.batch_size=16", "--config.n_micro=4", "--config.mesh.fsdp=8"],
     "batch_size=16 gives 2 example(s) per batch shard (data x fsdp = 8), not divisible by n_micro=4"),
    (["--config.mesh.data=3"], "8 devices cannot be split into data=3 fsdp=-1 tensor=1"),
    (["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"],
     "mesh data=2 x fsdp=2 x tensor=1 = 4 devices, but 8 are available"),
    (["--config.trainable=lora"], "trainable='lora' needs model.lora.rank > 0"),
    (["--config.trainable=biases"], "trainable must be one of"),
    (["--config.optim.warmup_steps=50"], "optim.warmup_steps must be in [0, total_steps=20]"),
    (["--config.optim.decay=step"], "optim.decay must be one of"),
    (["--config.guards.nonfinite=ignore"], "guards.nonfinite must be 'skip' or 'stop'"),
    (["--config.data.seq_len=128"], "data.seq_len=128 exceeds model.max_seq_len=64"),
])
def test_validation_errors_are_clear(overrides, message):
  cfg = load_config("tiny_lm", overrides)
  with pytest.raises(ConfigError) as e:
    validate_config(cfg, num_devices=8)
  assert message in str(e.value)


def test_valid_configs_validate():
  assert validate_config(load_config("tiny_lm"), num_devices=8) == []
  assert validate_config(load_config("llama2_7b_dpo"), num_devices=16) == []


def test_schedule_warmup_then_decay():
  o = mc.ConfigDict(dict(lr=1.0, warmup_steps=10, decay="cosine", end_lr_factor=0.1))
  s = make_schedule(o, total_steps=110)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
  assert float(s(110)) == pytest.approx(0.1, rel=1e-5)
  o.decay = "linear"
  s = make_schedule(o, total_steps=110)
  assert float(s(60)) == pytest.approx(0.55, rel=1e-5) and float(s(110)) == pytest.approx(0.1, rel=1e-5)
  o.decay = "constant"
  assert float(make_schedule(o, total_steps=110)(100)) == 1.0


def test_mesh_rules_and_host_batch_helpers():
  cfg = load_config("tiny_lm", ["--config.mesh.data=2", "--config.mesh.tensor=2"])
  mesh = shd.mesh_from_config(cfg.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2} and shd.data_parallel_size(mesh) == 4
  assert shd.rules_from_config(()) == shd.RULES
  rules = shd.rules_from_config([["batch", ["data", "fsdp"]], ["embed", None], ["mlp", "tensor"]])
  assert rules == (("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"))
  with pytest.raises(ValueError, match="unknown mesh axes"):
    shd.rules_from_config([["embed", "model"]])
  assert shd.host_batch_rows(16, mesh) == slice(0, 16)  # one process feeds every row
  host = {"tokens": np.arange(32).reshape(16, 2)}
  arrays = shd.host_local_to_global(host, mesh, 16)
  assert arrays["tokens"].shape == (16, 2)
  assert arrays["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(arrays["tokens"]), host["tokens"])


def test_initialize_distributed_is_a_noop_on_one_process(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
    monkeypatch.delenv(var, raising=False)
  assert shd.initialize_distributed("auto") is False
  assert shd.initialize_distributed("never") is False
  # libtpu's own "could not determine" message in TPU_WORKER_HOSTNAMES is not a host list
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine hosts, please set it")
  assert shd._multihost_env() is False
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert shd._multihost_env() is True
  with pytest.raises(ValueError, match="auto"):
    shd.initialize_distributed("sometimes")
