"""Checkpoints: round trip onto other meshes, keep-N, incomplete / corrupted steps, fresh-process loading."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from pro_jax import sharding as shd
from pro_jax.configs import load_config
from pro_jax.models import ModelConfig, Transformer, abstract_variables, init_variables, logical_axes
from pro_jax.train.checkpoint import Checkpointer, restore_base
from pro_jax.train.state import abstract_state, init_state, state_shardings

MCFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=48)
OPT = optax.adamw(1e-3)


def jit_init(model):
  """`init_variables` compiled (eager Flax init dispatches op by op: seconds on a busy CPU)."""
  return jax.jit(lambda key: init_variables(model, key))


_INIT = jit_init(Transformer(MCFG))
_INIT_STATE = jax.jit(lambda v: init_state(v, OPT, jax.random.PRNGKey(7)))


def _state(mesh, seed=0):
  """A TrainState with non-trivial values everywhere (moments included), sharded on `mesh`."""
  model = Transformer(MCFG)
  variables = jax.device_get(_INIT(jax.random.PRNGKey(seed)))
  opt = OPT
  state = jax.device_get(_INIT_STATE(variables))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(x.dtype)
                       if np.issubdtype(x.dtype, np.floating) else x, state)
  state = state.replace(step=np.int32(5), nonfinite_count=np.int32(2))
  sh = state_shardings(shd.param_shardings(logical_axes(model), variables, mesh), variables, opt, mesh)
  return jax.device_put(state, sh), sh, opt, variables


def _target(mesh, opt, variables):
  model = Transformer(MCFG)
  sh = state_shardings(shd.param_shardings(logical_axes(model), variables, mesh), variables, opt, mesh)
  return abstract_state(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables), opt, sh)


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_roundtrip_onto_other_mesh_shapes(tmp_path):
  state, _, opt, variables = _state(shd.make_mesh(2, 2, 2))
  ck = Checkpointer(tmp_path / "ck", keep=3)
  stats = {"mean": [0.5, -1.0], "std": [2.0, 3.0]}
  arrays = {"reward_mu": np.arange(3, dtype=np.float32)}
  ck.save(5, state, data_state={"position": 5, "seed": 0}, extra={"reward_stats": stats}, arrays=arrays,
          meta={"note": "x"})
  ck.save(6, state, data_state=b"\x00opaque\xff")
  ck.wait()
  host = jax.device_get(state)
  for mesh in (shd.make_mesh(1, 8, 1), shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
    r = ck.restore(_target(mesh, opt, variables), step=5)
    assert _equal(jax.device_get(r.state), host)
    q = r.state.params["params"]["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == mesh.shape
    assert type(r.state.opt_state[0]).__name__ == "ScaleByAdamState"  # Optax named tuples come back
    assert r.data_state == {"position": 5, "seed": 0}
    assert r.extra == {"reward_stats": stats} and r.meta["note"] == "x"
    np.testing.assert_array_equal(r.arrays["reward_mu"], arrays["reward_mu"])
  assert ck.restore(_target(shd.make_mesh(1, 8, 1), opt, variables)).data_state == b"\x00opaque\xff"
  ck.close()


def test_keep_n_incomplete_and_corrupted_steps(tmp_path, caplog):
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  states = {}
  ck = Checkpointer(tmp_path / "ck", keep=2)
  for step in (1, 2, 3, 4):
    states[step], _, opt, variables = _state(mesh, seed=step)
    ck.save(step, states[step], data_state={"position": step})
  ck.close()
  assert ck.all_steps() == [3, 4]  # keep-N
  # A save killed half-way leaves Orbax's tmp directory: never listed, never restored.
  tmp = tmp_path / "ck" / "5.orbax-checkpoint-tmp"
  (tmp / "params").mkdir(parents=True)
  (tmp / "params" / "garbage").write_bytes(b"\x00" * 10)
  ck = Checkpointer(tmp_path / "ck", keep=2)
  assert ck.all_steps() == [3, 4] and ck.latest_step() == 4
  target = _target(mesh, opt, variables)
  assert ck.restore(target).step == 4
  # A complete-looking newest step whose files were truncated: restore warns and uses the previous one.
  for root, _, files in os.walk(tmp_path / "ck" / "4" / "params"):
    for f in files:
      open(os.path.join(root, f), "wb").close()
  with caplog.at_level(logging.WARNING, logger="pro_jax"):
    r = ck.restore(target)
  assert r.step == 3 and r.data_state == {"position": 3}
  assert _equal(jax.device_get(r.state), jax.device_get(states[3]))
  assert "step 4" in caplog.text and "cannot be restored" in caplog.text
  with pytest.raises(Exception):
    ck.restore(target, step=4)  # an explicit step never falls back silently
  # the step that was being written when the process died is written again, completely
  states[5], _, _, _ = _state(mesh, seed=5)
  ck.save(5, states[5], data_state={"position": 5})
  ck.wait()
  assert 5 in ck.all_steps() and not tmp.exists()
  r = ck.restore(target)
  assert r.step == 5 and _equal(jax.device_get(r.state), jax.device_get(states[5]))
  ck.close()


def test_load_checkpoint_in_a_fresh_process(tmp_path):
  """A LoRA run (base weights saved once, LoRA in the checkpoints) loads with only the directory."""
  from pro_jax.train.tasks import build_task
  from pro_jax.train.trainer import train
  cfg = load_config("tiny_lm", ["--config.total_steps=2", "--config.trainable=lora", "--config.model.lora.rank=4",
                                "--config.checkpoint.every_steps=2", "--config.log.tensorboard=false",
                                "--config.mesh.fsdp=2", "--config.mesh.data=4"])
  task = build_task(cfg)
  task.extra = {"reward_norm": {"mean": [1.5], "std": [0.25]}}
  result = train(cfg, tmp_path / "run", task)
  assert result.step == 2 and set(result.state.params) == {"lora"}
  assert (tmp_path / "run" / "base").is_dir()
  lora = jax.device_get(result.state.params["lora"])
  code = f"""
import json, sys, numpy as np, jax
from pro_jax.train.checkpoint import load_checkpoint
ck = load_checkpoint({str(tmp_path / 'run')!r})
v = ck.variables
tokens = np.arange(8, dtype=np.int32)[None]
logits = ck.model.apply(v, tokens).logits
print(json.dumps({{"step": ck.step, "collections": sorted(v), "trainable": ck.config.trainable,
  "lora_rank": ck.model_config.lora.rank, "extra": ck.extra,
  "lora_sum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(v["lora"]))),
  "base_sum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(v["params"]))),
  "logits_finite": bool(np.isfinite(np.asarray(logits)).all()), "logits_shape": list(logits.shape)}}))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["step"] == 2 and got["collections"] == ["lora", "params"] and got["trainable"] == "lora"
  assert got["lora_rank"] == 4 and got["extra"] == {"reward_norm": {"mean": [1.5], "std": [0.25]}}
  want_lora = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(lora)))
  assert got["lora_sum"] == pytest.approx(want_lora, rel=1e-12)
  saved_base = jax.device_get(restore_base(tmp_path / "run"))
  abs_sum = lambda tree: float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(tree)))
  assert got["base_sum"] == pytest.approx(abs_sum(saved_base["params"]), rel=1e-12)
  # the base is the untouched initial model (initialized sharded, hence not bit-equal to this init)
  fresh = jax.device_get(jit_init(Transformer(task.model_config))(jax.random.PRNGKey(cfg.seed)))
  assert got["base_sum"] == pytest.approx(abs_sum(fresh["params"]), rel=1e-6)
  assert got["logits_finite"] and got["logits_shape"] == [1, 8, 128]
