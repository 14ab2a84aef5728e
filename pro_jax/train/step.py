"""The single jitted train step. Every stage plugs in its loss here; nothing else changes.

    step = build_train_step(loss_fn, optimizer, mesh=mesh, state_shardings=..., frozen_shardings=...,
                            batch_shardings=..., n_micro=4)
    state, metrics = step(state, frozen, batch)     # compiled once; state is donated

`loss_fn(params, frozen, batch, rng) -> (loss, metrics)` is pure:

* `params`: the trained model's full variables: the trainable tree (`state.params`, differentiated)
  merged with `frozen["base"]` (the non-trainable collections, e.g. base weights under LoRA);
* `frozen`: everything else that enters without gradients (`frozen["ref"]` a reference policy,
  reward models, ...), as given to the step;
* `batch`: a (micro-)batch, leading dimension = examples;
* `rng`: a fresh key per (micro-)step.

It returns a scalar loss and a dict of scalar metrics. When the loss is a mean over a varying number
of items (tokens, pairs), put that count in `metrics["loss_weight"]`: micro-batches are then combined
weighted by it, so that n micro-batches of B/n give the same loss and gradient as one batch of B
(the mean over all tokens of the batch, not the mean of per-micro-batch means).

Inside the step, in order:
1. `rng` split: one key kept in the state for the next step, one for this step (one per micro-batch).
2. value_and_grad of the loss w.r.t. the trainable tree only; with `n_micro > 1` a `lax.scan` over
   micro-batches (the batch reshaped to [n_micro, B/n_micro, ...], row i*n_micro + j in micro-batch j so
   each device's rows split evenly and nothing moves between devices) accumulating
   sum_j w_j * grad(loss_j), sum_j w_j * loss_j, sum_j w_j * metrics_j and sum_j w_j, divided by
   sum_j w_j at the end (w_j = metrics_j["loss_weight"], 1 when absent). Metrics are therefore
   weighted like the loss; "loss_weight" itself is reported summed.
3. Guard: if the loss, the gradient global norm, or any updated parameter or optimizer-state value
   is not finite (`guards.all_finite`: one scalar reduction), params and optimizer state stay as
   they were and `nonfinite_count` grows by one. `step` counts batches consumed, so it advances either
   way (the data iterator and the checkpoint step stay in line); Optax's own update count (which
   drives the learning-rate schedule) only advances on applied updates.
4. Optax update (AdamW + schedule + global-norm clipping from `make_optimizer`).

Metrics out (replicated float32 scalars): the loss function's, plus `loss`, `grad_norm` (before
clipping), `lr`, `nonfinite` (1.0 when this update was skipped) and `loss_weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pro_jax.sharding import BATCH_AXES, RULES, activation_sharding, data_parallel_size
from pro_jax.train.guards import all_finite
from pro_jax.train.state import TrainState, merge_variables

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
LOSS_WEIGHT = "loss_weight"


class TrainStep:
  """A jitted `step(state, frozen, batch) -> (state, metrics)`; traced under the mesh and rules.

  `jitted` is the `jax.jit` object (for `.lower()` / `.trace()` / cache inspection).
  """

  def __init__(self, jitted: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def __call__(self, state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
    with activation_sharding(self.mesh, self.rules):
      return self.jitted(state, frozen, batch)

  def lower(self, *args):
    with activation_sharding(self.mesh, self.rules):
      return self.jitted.lower(*args)

  def trace(self, *args):
    with activation_sharding(self.mesh, self.rules):
      return self.jitted.trace(*args)


def split_microbatches(batch: Any, n_micro: int, batch_shards: int = 1) -> Any:
  """[B, ...] -> [n_micro, B / n_micro, ...]; micro-batch j holds rows j, j + n_micro, j + 2 n_micro, ...

  With B split in `batch_shards` contiguous blocks (one per (data, fsdp) shard), every block holds
  B / batch_shards / n_micro rows of each micro-batch, so no row changes device.
  """

  def one(x):
    if x.shape[0] % (n_micro * batch_shards):
      raise ValueError(f"batch dimension {x.shape[0]} is not divisible by n_micro={n_micro} x batch shards "
                       f"(data x fsdp)={batch_shards}")
    x = x.reshape((x.shape[0] // n_micro, n_micro) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, P(None, BATCH_AXES, *([None] * (x.ndim - 2))))

  return jax.tree.map(one, batch)


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def build_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Mesh,
                     state_shardings: TrainState, frozen_shardings: Any, batch_shardings: Any,
                     n_micro: int = 1, schedule: optax.Schedule | None = None,
                     rules: Sequence[tuple[str, Any]] = RULES, donate: bool = True) -> TrainStep:
  """The jitted train step (see the module docstring). Shardings are explicit on every input/output.

  Args:
    loss_fn: `(params, frozen, batch, rng) -> (loss, metrics)`.
    optimizer: an Optax transformation (`make_optimizer`).
    mesh, rules: the device mesh and logical-axis rules for the model's activation constraints.
    state_shardings: a TrainState of NamedShardings (`state.state_shardings`).
    frozen_shardings: NamedShardings matching the `frozen` argument (a dict; "base" is merged
      into the trained variables).
    batch_shardings: NamedShardings matching the batch (`sharding.batch_shardings`).
    n_micro: gradient-accumulation micro-batches per step.
    schedule: the learning-rate schedule, only to report `lr`.
    donate: donate the state's buffers to the step (the caller must not reuse the old state).
  """
  if n_micro < 1:
    raise ValueError(f"n_micro must be >= 1, got {n_micro}")

  def step(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    base = frozen.get("base") if isinstance(frozen, dict) else None

    def weighted_loss(params, mb, key, weighted: bool):
      loss, metrics = loss_fn(merge_variables(params, base), frozen, mb, key)
      w = jax.lax.stop_gradient(jnp.asarray(metrics.get(LOSS_WEIGHT, 1.0), jnp.float32))
      scaled = loss.astype(jnp.float32) * w if weighted else loss.astype(jnp.float32)
      return scaled, (loss.astype(jnp.float32), _f32(metrics), w)

    if n_micro == 1:
      grad_fn = jax.value_and_grad(lambda p, mb, k: weighted_loss(p, mb, k, False), has_aux=True)
      (_, (loss, metrics, w)), grads = grad_fn(state.params, batch, step_rng)
    else:
      grad_fn = jax.value_and_grad(lambda p, mb, k: weighted_loss(p, mb, k, True), has_aux=True)
      micro = split_microbatches(batch, n_micro, data_parallel_size(mesh))
      keys = jax.random.split(step_rng, n_micro)
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state.params, micro, keys))
      _, (_, m_shape, _) = jax.eval_shape(
          lambda p, m, k: weighted_loss(p, jax.tree.map(lambda x: x[0], m), k[0], True), *shapes)
      zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)

      def body(carry, xs):
        g_acc, l_acc, m_acc, w_acc = carry
        mb, key = xs
        (wl, (_, m, w)), g = grad_fn(state.params, mb, key)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        m_acc = jax.tree.map(lambda a, b: a + w * b, m_acc, m)
        return (g_acc, l_acc + wl, m_acc, w_acc + w), None

      init = (zeros(state.params), jnp.zeros((), jnp.float32), zeros(m_shape), jnp.zeros((), jnp.float32))
      (g_sum, l_sum, m_sum, w_sum), _ = jax.lax.scan(body, init, (micro, keys))
      grads = jax.tree.map(lambda g, p: (g / w_sum).astype(p.dtype), g_sum, state.params)
      loss = l_sum / w_sum
      metrics = jax.tree.map(lambda m: m / w_sum, m_sum)
      w = w_sum

    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # the update itself too: hyperparameters that overflow in the params' dtype, overflowing moments
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new_params, new_opt_state))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt_state, state.opt_state), rng=rng,
                           nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32))
    metrics = dict(metrics)
    metrics.update(loss=loss, grad_norm=grad_norm.astype(jnp.float32), nonfinite=(~ok).astype(jnp.float32))
    metrics[LOSS_WEIGHT] = w
    if schedule is not None:  # Optax's count = applied updates = step - skipped
      metrics["lr"] = jnp.asarray(schedule(state.step - state.nonfinite_count), jnp.float32)
    return new_state, metrics

  rep = NamedSharding(mesh, P())
  jitted = jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,) if donate else ())
  return TrainStep(jitted, mesh, rules)


def build_eval_step(loss_fn: LossFn, *, mesh: Mesh, params_shardings: Any, frozen_shardings: Any,
                    batch_shardings: Any, rules: Sequence[tuple[str, Any]] = RULES) -> Callable[..., dict]:
  """`(params, frozen, batch) -> {"loss", **metrics, "loss_weight"}` (float32 scalars): the training loss
  and its metrics on a held-out batch, without gradients or an update; a fixed rng (dropout-free models).
  `loss_weight` is the batch's weight in a mean over batches (the loss's real rows; 1 if it gives none)."""

  def evaluate(params: Any, frozen: Any, batch: Any) -> dict:
    base = frozen.get("base") if isinstance(frozen, dict) else None
    loss, metrics = loss_fn(merge_variables(params, base), frozen, batch, jax.random.PRNGKey(0))
    out = {k: v for k, v in _f32(metrics).items() if jnp.ndim(v) == 0}
    out["loss"] = loss.astype(jnp.float32)
    out.setdefault(LOSS_WEIGHT, jnp.float32(1.0))  # real rows of the batch (padded rows weigh 0)
    return out

  jitted = jax.jit(evaluate, in_shardings=(params_shardings, frozen_shardings, batch_shardings))

  def run(params: Any, frozen: Any, batch: Any) -> dict:
    with activation_sharding(mesh, rules):
      return jitted(params, frozen, batch)

  return run
