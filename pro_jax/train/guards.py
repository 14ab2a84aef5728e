"""Guards that keep non-finite values out of the train state and its checkpoints.

Three layers, each cheap:

1. Inside the jitted step (`all_finite`): the loss, the gradient norm AND the updated parameters and
   optimizer state must be finite, else the update is skipped (`jnp.where`, state unchanged, one
   scalar reduction, no host sync). The update check catches what the loss / gradient check cannot:
   optimizer hyperparameters that overflow or underflow in the parameters' dtype (`optim.lr=1e39`
   is inf in float32; `optim.eps=1e-50` is 0, so rows with zero gradient become 0/0 = NaN), and
   moments that overflow (a finite gradient whose square is inf).
2. Before anything runs (`optimizer_hparam_errors`, from `validate_config`): the optimizer's
   hyperparameters are checked in the dtypes the optimizer computes in (the trained parameters'
   dtype and float32, where Optax evaluates the schedule and bias corrections).
3. In the loop: `check_before_save` refuses to write a state holding a non-finite value (it can
   only get there from a non-finite initial or restored state: step 1 keeps it out otherwise), and
   with `guards.nonfinite="stop"` it refuses to save a step whose update was skipped.
   `check_skipped` turns a run that skipped more than `guards.max_skipped_fraction` of its steps
   into `TooManySkippedError` (exit 1 with a message) instead of "done"; it fires as soon as the
   fraction can no longer be met, and at the end.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NONFINITE_MODES = ("skip", "stop")


class NonFiniteError(RuntimeError):
  """A non-finite loss / gradient / update with guards.nonfinite='stop', or a non-finite state."""


class TooManySkippedError(NonFiniteError):
  """More than guards.max_skipped_fraction of the run's steps were skipped as non-finite."""


def all_finite(tree: Any) -> jax.Array:
  """bool []: every floating-point leaf of `tree` is finite (one fused reduction per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


_all_finite_jit = jax.jit(all_finite)


def state_is_finite(state: Any) -> bool:
  """Host bool: the state's parameters and optimizer state are all finite (a device sync)."""
  return bool(jax.device_get(_all_finite_jit((state.params, state.opt_state))))


def optimizer_hparam_errors(optim: Any, param_dtype: str) -> list[str]:
  """Problems with the `optim` config section, checked in the dtypes the optimizer computes in.

  `param_dtype`: the trained parameters' dtype (Adam's moments and updates take it); float32 is
  always checked too (Optax evaluates the schedule and the bias corrections in it).
  """
  errors: list[str] = []
  try:
    dtypes = sorted({np.dtype(jnp.dtype(param_dtype)).name, "float32"})
  except TypeError:
    dtypes = ["float32"]  # the model dtype check reports the bad name

  def val(name: str) -> float | None:
    v = optim[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      errors.append(f"optim.{name} must be a number, got {v!r}")
      return None
    return float(v)

  lr, eps, b1, b2 = val("lr"), val("eps"), val("b1"), val("b2")
  wd, clip, end = val("weight_decay"), val("clip_norm"), val("end_lr_factor")
  for name, v in (("lr", lr), ("eps", eps), ("b1", b1), ("b2", b2), ("weight_decay", wd), ("clip_norm", clip),
                  ("end_lr_factor", end)):
    if v is not None and math.isnan(v):
      errors.append(f"optim.{name} is NaN" + (" (that would turn clipping off silently)" if name == "clip_norm" else ""))
  for dt in dtypes:
    info = jnp.finfo(dt)
    with np.errstate(over="ignore", under="ignore"):
      cast = lambda v: float(np.asarray(v, dtype=jnp.dtype(dt)).astype(np.float64))  # noqa: E731
      if lr is not None and lr > 0 and not math.isinf(lr) and not math.isfinite(cast(lr)):
        errors.append(f"optim.lr={lr!r} overflows {dt} (max {float(info.max):.3g}), the dtype the optimizer "
                      "computes in: every update would be inf / NaN")
      if eps is not None and 0 < eps < float(info.tiny):
        errors.append(f"optim.eps={eps!r} is below the smallest normal {dt} ({float(info.tiny):.3g}; it "
                      f"becomes {cast(eps)!r} in {dt}, the dtype the optimizer computes in): Adam's "
                      "m / (sqrt(v) + eps) is 0/0 = NaN wherever a gradient is 0")
      if b2 is not None and 0 <= b2 < 1 and cast(b2) >= 1:
        errors.append(f"optim.b2={b2!r} rounds to 1 in {dt}: Adam's bias correction 1 - b2^t is 0")
      if b1 is not None and 0 <= b1 < 1 and cast(b1) >= 1:
        errors.append(f"optim.b1={b1!r} rounds to 1 in {dt}: Adam's bias correction 1 - b1^t is 0")
      if wd is not None and math.isfinite(wd) and not math.isfinite(cast(wd)):
        errors.append(f"optim.weight_decay={wd!r} overflows {dt}")
  if wd is not None and math.isinf(wd):
    errors.append(f"optim.weight_decay must be finite, got {wd!r}")
  return errors


def guard_config_errors(guards: Any) -> list[str]:
  """Problems with the `guards` config section."""
  errors = []
  if guards.nonfinite not in NONFINITE_MODES:
    errors.append(f"guards.nonfinite must be 'skip' or 'stop', got {guards.nonfinite!r}")
  f = guards.get("max_skipped_fraction", 0.1)
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= float(f) <= 1:
    errors.append(f"guards.max_skipped_fraction must be a number in [0, 1], got {f!r}")
  return errors


def check_before_save(state: Any, where: str, nonfinite: Any, nonfinite_mode: str) -> None:
  """Raise NonFiniteError instead of writing a non-finite state (or, in "stop" mode, a skipped step).

  where: "step 12" (for the message); nonfinite: the step's non-finite flag or count (device or
  host scalar), or None.
  """
  if nonfinite_mode == "stop" and nonfinite is not None and float(nonfinite) > 0:
    raise NonFiniteError(f"{where}: non-finite loss, gradient or update (guards.nonfinite='stop'); its "
                         "update was skipped and it was not saved")
  if not state_is_finite(state):
    raise NonFiniteError(f"{where}: the train state holds non-finite parameters or optimizer state (it was "
                         "initialized or restored that way: check the imported weights); not saving it")


def check_skipped(skipped: int, updates_done: int, total_updates: int, max_fraction: float, *, final: bool) -> None:
  """TooManySkippedError when more than `max_fraction` of the updates were skipped.

  During the run (final=False) it fires once `skipped` exceeds `max_fraction * total_updates`, when
  the run can no longer end below the limit; at the end (final=True) against the updates done.
  (An update is a train step; PPO makes several per iteration.)
  """
  limit = updates_done if final else total_updates
  if limit <= 0 or skipped <= max_fraction * limit:
    return
  raise TooManySkippedError(
      f"{skipped} of {updates_done} updates were skipped because their loss, gradient or update was not finite "
      f"(more than guards.max_skipped_fraction={max_fraction:g} of "
      f"{'the run' if final else f'the run of {total_updates} updates'}): the model did not train. The "
      "checkpoints hold the last finite state. Check the data and the weights for NaN / inf, lower optim.lr, "
      "or raise guards.max_skipped_fraction")
