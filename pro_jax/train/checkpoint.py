"""Orbax checkpoints of the train state, with everything needed to resume exactly, and the loader.

Layout of a run directory (`workdir`):

    workdir/config.json           the run's config (written before the first step; guards reuse)
    workdir/checkpoints/<step>/   one Orbax CheckpointManager step, items:
        params   the trainable variables (`TrainState.params`)
        train    step, optimizer state, rng, nonfinite_count
        data     the data iterator's state (JSON; bytes are stored base64)
        extra    JSON-able metadata (e.g. reward normalization statistics)
        arrays   optional array metadata (a pytree of arrays)
        meta     {"config", "model_config", "trainable", "format"}
    workdir/base/                 the non-trainable model variables of LoRA / adapter runs (saved once)

Saves are asynchronous (the device-to-host copy happens before `save` returns, so the state can be
donated to the next step at once; files are written in a background thread). Orbax writes a step
into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a process killed mid-save
leaves only a tmp directory, which is never listed as a step (and is deleted when the next manager
starts). If the newest complete step cannot be read anyway (a truncated or corrupted directory),
`restore` warns and falls back to the previous step.

`load_checkpoint(dir, step=None)` is the loader for downstream code: given only a directory it
returns the model's full variables, the config, the `ModelConfig` and a ready `Transformer`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections as mc
import orbax.checkpoint as ocp
from etils import epath

from pro_jax.models import ModelConfig, Transformer, logical_axes
from pro_jax.sharding import param_shardings
from pro_jax.train.state import TrainState, merge_variables

log = logging.getLogger("pro_jax")

# Orbax warns on every read-only CheckpointManager (how load_checkpoint and the stages read a finished
# run) and on its own type-handler registration: expected, not actionable, and they bury the
# progress lines. Other absl warnings pass.
_ORBAX_NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
                'Type handler registry type "<class \'jax.')


class _OrbaxNoiseFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(m in message for m in _ORBAX_NOISE)


logging.getLogger("absl").addFilter(_OrbaxNoiseFilter())

CHECKPOINTS_DIR = "checkpoints"
BASE_DIR = "base"
FORMAT = 1
_ITEMS = ("params", "train", "data", "extra", "arrays", "meta")


def as_path(path: str | os.PathLike) -> epath.Path:
  """An absolute epath.Path (local paths made absolute; gs://... kept)."""
  return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def encode_data_state(state: Any) -> dict:
  """A JSON-able dict from an iterator state (a JSON-able dict, or bytes)."""
  if isinstance(state, (bytes, bytearray)):
    return {"__bytes_b64__": base64.b64encode(bytes(state)).decode("ascii")}
  return {"__state__": state}


def decode_data_state(obj: dict | None) -> Any:
  if not obj:
    return None
  if "__bytes_b64__" in obj:
    return base64.b64decode(obj["__bytes_b64__"])
  return obj.get("__state__")


@dataclasses.dataclass
class Restored:
  step: int
  state: TrainState
  data_state: Any
  extra: dict
  arrays: Any
  meta: dict


def _abstract(tree: Any, sharding: Any) -> Any:
  """ShapeDtypeStructs from Orbax array metadata, all with `sharding`."""
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)


_HANDLER_CONFIGURED = False
MIN_REPLICA_PARALLEL_BYTES = 1 << 20


def _configure_array_handler() -> None:
  """Orbax writes a replicated array in slices, one per replica ("replica-parallel"), slicing it with
  one small jitted op per shape: each compiles once, seconds of overhead for many small arrays. Keep
  replica-parallel for slices of >= 1 MiB only (big arrays, where it pays)."""
  global _HANDLER_CONFIGURED
  if _HANDLER_CONFIGURED:
    return
  _HANDLER_CONFIGURED = True
  try:
    from orbax.checkpoint._src.metadata import array_metadata_store
    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  except Exception as e:  # noqa: BLE001 (an Orbax version without these: keep its defaults)
    log.debug("keeping Orbax's default ArrayHandler: %s", e)


class Checkpointer:
  """An Orbax CheckpointManager over `directory` (usually `workdir/checkpoints`)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    _configure_array_handler()
    self.directory = as_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           enable_async_checkpointing=async_save, read_only=read_only)
    handlers = {name: ocp.StandardCheckpointHandler() if name in ("params", "train", "arrays")
                else ocp.JsonCheckpointHandler() for name in _ITEMS}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, *, data_state: Any = None, extra: dict | None = None,
           arrays: Any = None, meta: dict | None = None) -> bool:
    """Start saving `state` as `step` (returns once the arrays are copied to host memory)."""
    items = dict(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
                                     "nonfinite_count": state.nonfinite_count}),
        data=ocp.args.JsonSave(encode_data_state(data_state)),
        extra=ocp.args.JsonSave(dict(extra or {})),
        meta=ocp.args.JsonSave(dict(meta or {}, format=FORMAT)),
    )
    if arrays is not None and jax.tree.leaves(arrays):
      items["arrays"] = ocp.args.StandardSave(arrays)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _has_item(self, step: int, name: str) -> bool:
    return (self.directory / str(step) / name).is_dir()

  def read_json(self, step: int, name: str) -> Any:
    return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

  def restore(self, abstract_state: TrainState, step: int | None = None, abstract_arrays: Any = None) -> Restored:
    """Restore onto the shardings carried by `abstract_state` (any mesh shape).

    step=None: the newest step that restores; a step that fails to read is skipped with a warning.
    `abstract_arrays`: target for the `arrays` item (default: restored on the first device).
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for s in steps:
      try:
        return self._restore_step(s, abstract_state, abstract_arrays)
      except Exception as e:  # noqa: BLE001 (a truncated / corrupted step: fall back)
        if step is not None:
          raise
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying an older one",
                    s, self.directory, type(e).__name__, e)
        errors.append(f"step {s}: {type(e).__name__}: {e}")
    raise RuntimeError(f"no checkpoint in {self.directory} could be restored:\n" + "\n".join(errors))

  def _restore_step(self, step: int, abstract_state: TrainState, abstract_arrays: Any) -> Restored:
    train_target = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                    "rng": abstract_state.rng, "nonfinite_count": abstract_state.nonfinite_count}
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 train=ocp.args.StandardRestore(train_target),
                 data=ocp.args.JsonRestore(), extra=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    if self._has_item(step, "arrays"):
      if abstract_arrays is None:
        md = self.manager.item_metadata(step)["arrays"]
        abstract_arrays = _abstract(getattr(md, "tree", md), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
      items["arrays"] = ocp.args.StandardRestore(abstract_arrays)
    r = self.manager.restore(step, args=ocp.args.Composite(**items))
    t = r["train"]
    state = TrainState(step=t["step"], params=r["params"], opt_state=t["opt_state"], rng=t["rng"],
                       nonfinite_count=t["nonfinite_count"])
    return Restored(step=step, state=state, data_state=decode_data_state(r["data"]), extra=r["extra"] or {},
                    arrays=r.get("arrays") if "arrays" in items else None, meta=r["meta"] or {})


def save_base(workdir: str | os.PathLike, base: Any) -> None:
  """Save the non-trainable model variables once (atomic; skipped when already there)."""
  path = epath.Path(workdir) / BASE_DIR
  if path.exists() or not jax.tree.leaves(base):
    return
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(as_path(path), base)
  ckptr.wait_until_finished()
  ckptr.close()


def restore_base(workdir: str | os.PathLike, abstract_base: Any = None) -> Any | None:
  """The saved base variables (onto `abstract_base`'s shardings, or the first device), or None."""
  path = as_path(epath.Path(workdir) / BASE_DIR)
  if not path.exists():
    return None
  ckptr = ocp.StandardCheckpointer()
  if abstract_base is None:
    md = ckptr.metadata(path)
    md = getattr(md, "item_metadata", md)
    abstract_base = _abstract(getattr(md, "tree", md), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  out = ckptr.restore(path, abstract_base)
  ckptr.close()
  return out


def base_for_fresh_run(workdir: str | os.PathLike, base: Any, abstract_base: Any = None) -> Any:
  """The non-trainable variables of a run starting at step 0: exactly what a previous attempt
  saved, if one got that far; else `base`, saved now (so a restart never re-derives them)."""
  if not jax.tree.leaves(base):
    return base
  saved = restore_base(workdir, abstract_base)
  if saved is not None:
    return saved
  save_base(workdir, base)
  return base


def config_from_json(obj: Any) -> mc.ConfigDict:
  if isinstance(obj, str):
    obj = json.loads(obj)
  return mc.ConfigDict(obj)


@dataclasses.dataclass
class LoadedCheckpoint:
  """What `load_checkpoint` returns."""

  variables: Any  # the trained model's full variables {"params": ..., ["lora": ...]}
  config: mc.ConfigDict  # the run's config
  model_config: Any  # pro_jax.models.ModelConfig, or None (e.g. an adapter run)
  model: Any  # pro_jax.models.Transformer(model_config), or None
  extra: dict  # JSON metadata saved with the step (e.g. normalization statistics)
  arrays: Any  # array metadata saved with the step, or None
  step: int
  directory: epath.Path

  @property
  def params(self) -> Any:
    return self.variables["params"] if "params" in self.variables else self.variables


def _checkpoints_dir(path: epath.Path) -> tuple[epath.Path, epath.Path]:
  """(workdir, checkpoints dir) from either."""
  if (path / CHECKPOINTS_DIR).is_dir():
    return path, path / CHECKPOINTS_DIR
  return path.parent, path


def load_checkpoint(directory: str | os.PathLike, step: int | None = None, *, mesh: Any = None) -> LoadedCheckpoint:
  """Load a training run's model from `directory` (a workdir or its `checkpoints/`), no training code.

  step=None: the newest complete step. With `mesh`, parameters are placed with the model's logical
  shardings on it (`pro_jax.sharding.param_shardings`); without, on the first device.
  """

  directory = as_path(directory)
  workdir, ckdir = _checkpoints_dir(directory)
  if not ckdir.is_dir():
    raise FileNotFoundError(f"{directory}: no checkpoints directory")
  ck = Checkpointer(ckdir, read_only=True)
  steps = ck.all_steps()
  if not steps:
    raise FileNotFoundError(f"{ckdir}: no complete checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{ckdir}: no step {step} (steps: {steps})")
  meta = ck.read_json(step, "meta")
  extra = ck.read_json(step, "extra") or {}
  model_config = ModelConfig.from_dict(meta["model_config"]) if meta.get("model_config") else None
  model = Transformer(model_config) if model_config is not None else None
  first = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def target(name_md):
    abstract = _abstract(getattr(name_md, "tree", name_md), first)
    if mesh is not None and model is not None:
      axes = logical_axes(model)
      sub_axes = {k: axes[k] for k in abstract if k in axes}
      shardings = param_shardings(sub_axes, {k: abstract[k] for k in sub_axes}, mesh)
      abstract = dict(abstract)
      for k in sub_axes:
        abstract[k] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract[k], shardings[k])
    return abstract

  md = ck.manager.item_metadata(step)
  items = {"params": ocp.args.StandardRestore(target(md["params"]))}
  arrays = None
  if ck._has_item(step, "arrays"):
    items["arrays"] = ocp.args.StandardRestore(_abstract(getattr(md["arrays"], "tree", md["arrays"]), first))
  r = ck.manager.restore(step, args=ocp.args.Composite(**items))
  arrays = r["arrays"] if "arrays" in items else None
  ck.manager.close()
  trainable = r["params"]
  base = None
  if (workdir / BASE_DIR).exists():
    ckptr = ocp.StandardCheckpointer()
    bmd = ckptr.metadata(workdir / BASE_DIR)
    base = ckptr.restore(workdir / BASE_DIR, target(getattr(bmd, "item_metadata", bmd)))
    ckptr.close()
  return LoadedCheckpoint(variables=merge_variables(trainable, base), config=config_from_json(meta.get("config", {})),
                          model_config=model_config, model=model, extra=extra, arrays=arrays, step=step,
                          directory=ckdir)
