"""No non-finite checkpoint, ever: the update guard inside the step, the check before every save, the
skipped-steps limit, and optimizer hyperparameters validated in the dtype the optimizer computes in."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pro_jax import sharding as shd
from pro_jax.cli import main
from pro_jax.configs import load_config
from pro_jax.models import ModelConfig, Transformer, init_variables, logical_axes
from pro_jax.train.checkpoint import Checkpointer
from pro_jax.train.data import SyntheticLM
from pro_jax.train.losses import lm_loss
from pro_jax.train.state import init_state, state_shardings
from pro_jax.train.step import build_train_step
from pro_jax.train.tasks import build_task
from pro_jax.train.guards import NonFiniteError, TooManySkippedError
from pro_jax.train.trainer import train

B, L, V = 4, 16, 96
MCFG = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=48, max_seq_len=L)


@pytest.mark.parametrize("optimizer, what", [
    (optax.adam(1e39), "lr=1e39: inf in float32, finite in float64"),
    (optax.adam(1e-3, eps=1e-50), "eps=1e-50: 0 in float32, so 0/0 on embedding rows without gradient"),
])
def test_nonfinite_update_with_finite_loss_and_gradient_is_skipped(optimizer, what):
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model = Transformer(MCFG)
  variables = jax.jit(lambda k: init_variables(model, k))(jax.random.PRNGKey(0))
  var_sh = shd.param_shardings(logical_axes(model), variables, mesh)
  st_sh = state_shardings(var_sh, variables, optimizer, mesh)
  batch = next(SyntheticLM(0, B, L, V // 2))  # ids < V/2: the upper embedding rows get no gradient
  step = build_train_step(lm_loss(model), optimizer, mesh=mesh, state_shardings=st_sh, frozen_shardings={"base": {}},
                          batch_shardings=shd.batch_shardings(batch, mesh))
  state = jax.jit(lambda p: init_state(p, optimizer, jax.random.PRNGKey(1)), out_shardings=st_sh)(variables)
  before = jax.device_get(state.params)
  new, metrics = step(state, {"base": {}}, batch)
  # the loss and the gradient are finite: only the update is not (the case the old guard missed)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"])), what
  assert float(metrics["nonfinite"]) == 1.0 and int(new.nonfinite_count) == 1, what
  after = jax.device_get(new.params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))), what
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(new.opt_state))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _cfg(*extra):
  return load_config("tiny_lm", ["--config.total_steps=4", "--config.checkpoint.every_steps=2",
                                 "--config.log.tensorboard=false", "--config.log.every_steps=1",
                                 "--config.mesh.fsdp=2", "--config.mesh.data=4", *extra])


def _nan_weights_task(cfg):
  """The tiny LM task initialised with a NaN final-norm scale: every loss is NaN, every step skipped."""
  task = build_task(cfg)
  init = task.init_variables

  def nan_init(rng, shardings):
    v = init(rng, shardings=shardings)
    scale = v["params"]["final_norm"]["scale"]
    v["params"]["final_norm"]["scale"] = scale.at[0].set(jnp.nan)
    return v

  task.init_variables = nan_init
  return task


def test_a_nonfinite_state_is_never_saved(tmp_path):
  # max_skipped_fraction=1 so the skip limit does not fire first: the check before the save must
  cfg = _cfg("--config.guards.max_skipped_fraction=1.0")
  with pytest.raises(NonFiniteError, match="step 2: the train state holds non-finite"):
    train(cfg, tmp_path / "nan", _nan_weights_task(cfg))
  assert Checkpointer(tmp_path / "nan" / "checkpoints", read_only=True).all_steps() == []


def test_stop_mode_saves_nothing_for_a_skipped_step(tmp_path):
  cfg = _cfg("--config.guards.nonfinite=stop", "--config.checkpoint.every_steps=1",
             "--config.guards.max_skipped_fraction=1.0")
  with pytest.raises(NonFiniteError, match="step 1: non-finite loss, gradient or update"):
    train(cfg, tmp_path / "stop", _nan_weights_task(cfg))
  assert Checkpointer(tmp_path / "stop" / "checkpoints", read_only=True).all_steps() == []


def test_a_run_that_skipped_too_many_steps_fails_with_a_message(tmp_path, capsys):
  cfg = _cfg()  # default guards.max_skipped_fraction = 0.1
  with pytest.raises(TooManySkippedError, match=r"1 of 1 updates were skipped .*max_skipped_fraction=0.1"):
    train(cfg, tmp_path / "skip", _nan_weights_task(cfg))  # stops at the first log, not after 4 steps
  logged = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1]
  assert Checkpointer(tmp_path / "skip" / "checkpoints", read_only=True).all_steps() == []


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lr=1e39", "optim.lr=1e+39 overflows float32"),
    ("--config.optim.eps=1e-50", "optim.eps=1e-50 is below the smallest normal float32"),
    ("--config.optim.clip_norm=nan", "optim.clip_norm is NaN"),
    ("--config.optim.b2=0.999999999", "optim.b2=0.999999999 rounds to 1 in float32"),
    ("--config.model.dtype=float17", "model.dtype='float17' is not a floating-point dtype"),
])
def test_bad_optimizer_or_dtype_is_a_usage_error_before_anything_is_written(tmp_path, capsys, override, message):
  workdir = tmp_path / "run"
  rc = main(["train", "--config", "tiny_lm", "--workdir", str(workdir), "--config.total_steps=2",
             "--config.log.tensorboard=false", override])
  err = capsys.readouterr().err
  assert rc == 2 and message in err, err[-2000:]
  assert not workdir.exists()


def test_bfloat16_params_validate_eps_in_bfloat16():
  from pro_jax.train.guards import optimizer_hparam_errors
  optim = load_config("tiny_lm").optim
  assert optimizer_hparam_errors(optim, "bfloat16") == []
  optim.eps = 1e-40  # a float32 subnormal: flushed to zero on TPUs, 0 in bfloat16
  assert any("optim.eps=1e-40 is below the smallest normal" in e for e in optimizer_hparam_errors(optim, "bfloat16"))
