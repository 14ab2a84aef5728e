"""The train step: sharded == single device, micro-batches == full batch, LoRA-only, guards, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pro_jax import sharding as shd
from pro_jax.configs import load_config
from pro_jax.models import LoRAConfig, ModelConfig, Transformer, init_variables, logical_axes
from pro_jax.train.data import SyntheticLM
from pro_jax.train.losses import lm_loss
from pro_jax.train.optimizer import make_optimizer
from pro_jax.train.state import init_state, split_variables, state_shardings
from pro_jax.train.step import build_train_step, split_microbatches


def jit_init(model):
  """`init_variables` compiled (eager Flax init dispatches op by op: seconds on a busy CPU)."""
  return jax.jit(lambda key: init_variables(model, key))

B, L, V = 8, 16, 96
MCFG = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=L)


def one_device_mesh():
  return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def batches(n, seed=0, batch=B):
  data = SyntheticLM(seed, batch, L, V, min_len=3)
  return [next(data) for _ in range(n)]


def make_step(mesh, optimizer, variables, *, loss_fn=None, n_micro=1, trainable="full", schedule=None,
              model=None, example=None):
  """(jitted step, initial state, frozen, batch shardings) for `variables` on `mesh`."""
  model = model or Transformer(MCFG)
  axes = logical_axes(model)
  var_sh = shd.param_shardings(axes, variables, mesh)
  trainable_vars, base = split_variables(variables, trainable)
  trainable_sh, base_sh = split_variables(var_sh, trainable)
  st_sh = state_shardings(trainable_sh, trainable_vars, optimizer, mesh)
  batch_sh = shd.batch_shardings(example if example is not None else batches(1)[0], mesh)
  step = build_train_step(loss_fn or lm_loss(model), optimizer, mesh=mesh, state_shardings=st_sh,
                          frozen_shardings={"base": base_sh}, batch_shardings=batch_sh, n_micro=n_micro,
                          schedule=schedule)
  state = jax.jit(lambda p: init_state(p, optimizer, jax.random.PRNGKey(1)), out_shardings=st_sh)(trainable_vars)
  frozen = {"base": jax.device_put(base, base_sh)}
  return step, state, frozen, batch_sh


@pytest.fixture(scope="module")
def variables():
  return jax.device_get(jit_init(Transformer(MCFG))(jax.random.PRNGKey(0)))


def run(mesh, optimizer, variables, data, **kw):
  step, state, frozen, batch_sh = make_step(mesh, optimizer, variables, example=data[0], **kw)
  losses = []
  for b in data:
    state, metrics = step(state, frozen, jax.device_put(b, batch_sh))
    losses.append(float(metrics["loss"]))
  spec = state.params["params"]["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec
  return np.array(losses), jax.device_get(state), spec


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sharded_8_devices_matches_1_device(variables):
  cfg = load_config("tiny_lm", ["--config.optim.warmup_steps=1"])
  opt, schedule = make_optimizer(cfg.optim, 5)
  data = batches(5)
  l1, s1, _ = run(one_device_mesh(), opt, variables, data, schedule=schedule)
  l8, s8, spec8 = run(shd.make_mesh(2, 2, 2), opt, variables, data, schedule=schedule)
  np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=0)
  assert l1[-1] < l1[0]  # it trains
  assert max_diff(s1.params, s8.params) < 1e-5
  assert max_diff(s1.params, variables) > 1e-4  # and parameters moved
  assert spec8 == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # really sharded


def test_four_microbatches_equal_one_full_batch(variables):
  # SGD(lr=1): the parameter change IS the gradient, so this compares accumulated gradients directly.
  opt = optax.sgd(1.0)
  data = batches(1, seed=3, batch=16)  # 16 = n_micro x (data x fsdp) on the 8-device mesh
  lengths = data[0]["loss_mask"].sum(1)
  assert len(set(lengths.tolist())) > 2  # rows of different lengths: token weighting matters
  l_full, s_full, _ = run(one_device_mesh(), opt, variables, data)
  l_micro, s_micro, _ = run(shd.make_mesh(2, 2, 2), opt, variables, data, n_micro=4)
  np.testing.assert_allclose(l_micro, l_full, rtol=1e-6)
  assert max_diff(s_full.params, s_micro.params) <= 1e-6
  assert max_diff(s_full.params, variables) > 1e-3  # the step did something

  # Control: averaging the 4 micro-batch means with equal weights is measurably different.
  model = Transformer(MCFG)
  loss_fn = jax.jit(lm_loss(model))
  per_micro = [float(loss_fn(variables, {}, {k: v[j::4] for k, v in data[0].items()}, None)[0])
               for j in range(4)]
  assert abs(np.mean(per_micro) - l_full[0]) > 1e-4


def test_microbatch_split_keeps_rows_on_their_devices():
  mesh = shd.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  x = jax.device_put(jnp.arange(16), shd.batch_sharding(mesh, 1))
  with shd.activation_sharding(mesh):
    m = jax.jit(lambda x: split_microbatches({"x": x}, 4, 2)["x"])(x)
  np.testing.assert_array_equal(m[1], [1, 5, 9, 13])
  # micro-batch 1's rows 1, 5 live on device 0 (rows 0-7) and 9, 13 on device 1 (rows 8-15)
  shard_rows = sorted((s.index[1].start or 0, np.asarray(s.data).ravel().tolist()) for s in m.addressable_shards)
  assert [rows for _, rows in shard_rows] == [[0, 4, 1, 5, 2, 6, 3, 7], [8, 12, 9, 13, 10, 14, 11, 15]]
  with pytest.raises(ValueError, match="not divisible"):
    split_microbatches({"x": jnp.arange(12)}, 4, 2)


def _count_dots_with_shape(jaxpr, shapes):
  """Number of dot_general equations (recursively) whose output shape is in `shapes`."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and tuple(eqn.outvars[0].aval.shape) in shapes:
      n += 1
    for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
      n += _count_dots_with_shape(sub, shapes)
    for p in eqn.params.values():
      for j in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          n += _count_dots_with_shape(inner, shapes)
        elif hasattr(j, "eqns"):
          n += _count_dots_with_shape(j, shapes)
  return n


def test_lora_only_trains_lora_and_takes_no_base_weight_gradients():
  mcfg = MCFG.replace(lora=LoRAConfig(rank=4, targets=("q_proj", "v_proj", "gate_proj")))
  model = Transformer(mcfg)
  variables = jax.device_get(jit_init(model)(jax.random.PRNGKey(0)))
  # B starts at 0 in PEFT's init; make it non-zero so the LoRA path carries a gradient to A too
  variables["lora"] = jax.tree.map(lambda x: x + 0.01, variables["lora"])
  opt = optax.adam(1e-2)
  mesh = shd.make_mesh(2, 2, 2)
  data = batches(3)
  step, state, frozen, batch_sh = make_step(mesh, opt, variables, trainable="lora", model=model)
  assert set(state.params) == {"lora"} and set(frozen["base"]) == {"params"}
  # gradients exist only for LoRA leaves: the optimizer state mirrors the trainable tree
  mu = state.opt_state[0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)
  # no weight-gradient matmul for any base kernel in the LoRA step; the full step has them
  kernel_shapes = {tuple(x.shape[1:]) for x in jax.tree.leaves(variables["params"]["layers"]) if x.ndim == 3}
  kernel_shapes |= {tuple(variables["params"]["lm_head"]["kernel"].shape)}
  args = (state, frozen, jax.device_put(data[0], batch_sh))
  lora_jaxpr = step.trace(*args).jaxpr.jaxpr
  assert _count_dots_with_shape(lora_jaxpr, kernel_shapes) == 0
  full_step, full_state, full_frozen, _ = make_step(mesh, opt, variables, trainable="full", model=model)
  full_jaxpr = full_step.trace(full_state, full_frozen, args[2]).jaxpr.jaxpr
  assert _count_dots_with_shape(full_jaxpr, kernel_shapes) >= len(kernel_shapes)

  for b in data:
    state, metrics = step(state, frozen, jax.device_put(b, batch_sh))
  after = jax.device_get(state.params["lora"])
  changed = jax.tree.map(lambda a, b: bool(np.any(np.abs(a - b) > 1e-6)), after, variables["lora"])
  assert all(jax.tree.leaves(changed))  # every LoRA leaf moved
  assert max_diff(jax.device_get(frozen["base"]["params"]), variables["params"]) == 0.0  # base untouched


def test_nonfinite_update_is_skipped_and_counted_and_compiles_once(variables):
  model = Transformer(MCFG)
  base_loss = lm_loss(model)
  traces = []

  def loss_fn(params, frozen, batch, rng):
    traces.append(1)  # runs only while tracing
    loss, metrics = base_loss(params, frozen, batch, rng)
    return loss * batch["scale"][0], metrics

  opt = optax.adamw(1e-2)
  data = batches(4)
  for i, b in enumerate(data):
    b["scale"] = np.full((B,), np.nan if i == 1 else 1.0, np.float32)
  mesh = shd.make_mesh(2, 2, 2)
  model_axes = logical_axes(model)
  var_sh = shd.param_shardings(model_axes, variables, mesh)
  st_sh = state_shardings(var_sh, variables, opt, mesh)
  batch_sh = shd.batch_shardings(data[0], mesh)
  step = build_train_step(loss_fn, opt, mesh=mesh, state_shardings=st_sh, frozen_shardings={"base": {}},
                          batch_shardings=batch_sh)
  state = jax.jit(lambda p: init_state(p, opt, jax.random.PRNGKey(1)), out_shardings=st_sh)(variables)
  history = []
  for b in data:
    before = jax.device_get(state)
    state, metrics = step(state, {"base": {}}, jax.device_put(b, batch_sh))
    history.append((before, jax.device_get(state), jax.device_get(metrics)))
  before, after, m = history[1]
  assert np.isnan(m["loss"]) and m["nonfinite"] == 1.0
  assert max_diff(before.params, after.params) == 0.0  # params untouched
  assert max_diff(before.opt_state, after.opt_state) == 0.0  # Adam moments and count untouched
  assert int(after.nonfinite_count) == 1 and int(after.step) == 2  # counted; the step counter advances
  assert not np.array_equal(before.rng, after.rng)
  final = history[-1][1]
  assert int(final.nonfinite_count) == 1 and int(final.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(final.params))
  assert history[2][2]["nonfinite"] == 0.0 and max_diff(history[2][0].params, history[2][1].params) > 0
  # compiled once: one trace of the loss, one executable, over 4 steps
  assert len(traces) == 1
  assert step.jitted._cache_size() == 1
