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
`restore` warns and falls back to the newest step that restores; the steps newer than it that failed
are MOVED ASIDE to `workdir/checkpoints.damaged/<step>` (kept for inspection, never deleted), so the
run can write those step numbers again instead of failing on them at every rerun. When no step
restores, nothing is moved and one `CheckpointReadError` names every step and item that failed.

`load_checkpoint(dir, step=None)` is the loader for downstream code: given only a directory it
returns the model's full variables, the config, the `ModelConfig` and a ready `Transformer`; it
falls back the same way (read-only: nothing is moved), and an explicit `step=` never falls back.
Every read error is a `CheckpointReadError` naming the directory, the step and the item.
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
DAMAGED_SUFFIX = ".damaged"  # <checkpoints dir>.damaged/<step>: steps that could not be restored
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


class CheckpointReadError(RuntimeError):
  """A checkpoint item that cannot be read; the message names the directory, step and item."""

  def __init__(self, message: str, *, directory: Any = None, step: int | None = None, item: str | None = None):
    super().__init__(message)
    self.directory, self.step, self.item = directory, step, item


def _read_error(directory: Any, step: int, item: str, e: Exception) -> CheckpointReadError:
  return CheckpointReadError(f"{directory}/{step}: item {item!r} cannot be read ({type(e).__name__}: {e})",
                             directory=directory, step=step, item=item)


def _restore_items(manager: ocp.CheckpointManager, directory: Any, step: int, items: dict[str, Any]) -> dict:
  """Restore `items` ({name: restore args}) of `step` one by one; an error names its item."""
  out = {}
  for name, args in items.items():
    try:
      out[name] = manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
    except Exception as e:  # noqa: BLE001 (Orbax / tensorstore / JSON errors of a damaged item)
      raise _read_error(directory, step, name, e) from e
  return out


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
    self.read_only = read_only
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
    return _restore_items(self.manager, self.directory, step, {name: ocp.args.JsonRestore()})[name]

  def item_metadata(self, step: int, name: str) -> Any:
    try:
      md = self.manager.item_metadata(step)[name]
    except Exception as e:  # noqa: BLE001
      raise _read_error(self.directory, step, name, e) from e
    if md is None:
      raise _read_error(self.directory, step, name, ValueError("no metadata"))
    return getattr(md, "tree", md)

  def move_aside(self, steps: list[int]) -> list[epath.Path]:
    """Move unreadable `steps` to `<directory>.damaged/<step>[.n]` (kept, not deleted); returns the new paths."""
    moved = []
    aside = self.directory.parent / (self.directory.name + DAMAGED_SUFFIX)
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for s in steps:
        dst, n = aside / str(s), 1
        while dst.exists():
          dst, n = aside / f"{s}.{n}", n + 1
        (self.directory / str(s)).rename(dst)
        log.warning("moved unreadable checkpoint step %d aside: %s -> %s (kept for inspection; training "
                    "continues from an older step and will write step %d again)", s, self.directory / str(s), dst, s)
        moved.append(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("pro_jax_checkpoint_move_aside")
    self.manager.reload()
    return moved

  def restore(self, abstract_state: TrainState, step: int | None = None, abstract_arrays: Any = None) -> Restored:
    """Restore onto the shardings carried by `abstract_state` (any mesh shape).

    step=None: the newest step that restores; a step that fails to read is skipped with a warning.
    `abstract_arrays`: target for the `arrays` item (default: restored on the first device).
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failed: list[CheckpointReadError] = []
    for s in steps:
      try:
        restored = self._restore_step(s, abstract_state, abstract_arrays)
      except CheckpointReadError as e:  # a truncated / corrupted step: fall back
        if step is not None:
          raise
        log.warning("checkpoint step %d cannot be restored (%s); trying an older one", s, e)
        failed.append(e)
        continue
      if failed and not self.read_only:  # newer steps that failed while this one restores: damaged
        self.move_aside([e.step for e in failed])
      return restored
    raise CheckpointReadError(
        f"no checkpoint in {self.directory} could be restored (nothing was moved or deleted):\n  " +
        "\n  ".join(str(e) for e in failed) + "\nif these steps are damaged, move them out of the directory to "
        "start over (or restore an explicit step)", directory=self.directory)

  def _restore_step(self, step: int, abstract_state: TrainState, abstract_arrays: Any) -> Restored:
    train_target = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                    "rng": abstract_state.rng, "nonfinite_count": abstract_state.nonfinite_count}
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 train=ocp.args.StandardRestore(train_target),
                 data=ocp.args.JsonRestore(), extra=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    if self._has_item(step, "arrays"):
      if abstract_arrays is None:
        abstract_arrays = _abstract(self.item_metadata(step, "arrays"),
                                    jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
      items["arrays"] = ocp.args.StandardRestore(abstract_arrays)
    r = _restore_items(self.manager, self.directory, step, items)
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
    abstract_base = _abstract(getattr(md, "tree", md), jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
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


def load_checkpoint(directory: str | os.PathLike, step: int | None = None, *, mesh: Any = None,
                    rules: Any = None) -> LoadedCheckpoint:
  """Load a training run's model from `directory` (a workdir or its `checkpoints/`), no training code.

  step=None: the newest step that reads completely (an unreadable newer step is skipped with a
  warning; nothing is moved); an explicit `step` never falls back. With `mesh` (any axis names;
  `pro_jax.sharding.rules_for_mesh`), parameters are placed with the model's logical shardings on it
  (`pro_jax.sharding.param_shardings` with `rules`, default `pro_jax.sharding.RULES`); without, on the
  first device. Read errors are `CheckpointReadError`s naming the directory, step and item.
  """
  directory = as_path(directory)
  workdir, ckdir = _checkpoints_dir(directory)
  if not ckdir.is_dir():
    raise FileNotFoundError(f"{directory}: no checkpoints directory")
  ck = Checkpointer(ckdir, read_only=True)
  try:
    steps = ck.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckdir}: no complete checkpoint")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckdir}: no step {step} (steps: {steps})")
    failed: list[CheckpointReadError] = []
    for s in ([step] if step is not None else steps[::-1]):
      try:
        loaded = _load_step(ck, workdir, s, mesh, rules)
      except CheckpointReadError as e:
        if step is not None or e.item == BASE_DIR:
          raise
        log.warning("checkpoint step %d cannot be loaded (%s); trying an older one", s, e)
        failed.append(e)
        continue
      if failed:
        log.warning("%s: loaded step %d, not the newest step %d (unreadable)", ckdir, s, steps[-1])
      return loaded
    raise CheckpointReadError(f"no checkpoint in {ckdir} can be loaded:\n  " + "\n  ".join(str(e) for e in failed),
                              directory=ckdir)
  finally:
    ck.manager.close()


def _load_step(ck: Checkpointer, workdir: epath.Path, step: int, mesh: Any, rules: Any = None) -> LoadedCheckpoint:
  ckdir = ck.directory
  meta = ck.read_json(step, "meta") or {}
  extra = ck.read_json(step, "extra") or {}
  try:
    model_config = ModelConfig.from_dict(meta["model_config"]) if meta.get("model_config") else None
    cfg = config_from_json(meta.get("config", {}))
  except Exception as e:  # noqa: BLE001 (a meta item that parses but is not ours)
    raise _read_error(ckdir, step, "meta", e) from e
  model = Transformer(model_config) if model_config is not None else None
  first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def target(tree_md):
    abstract = _abstract(tree_md, first)
    if mesh is not None and model is not None:
      axes = logical_axes(model)
      sub_axes = {k: axes[k] for k in abstract if k in axes}
      shardings = param_shardings(sub_axes, {k: abstract[k] for k in sub_axes}, mesh, rules)
      abstract = dict(abstract)
      for k in sub_axes:
        abstract[k] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract[k], shardings[k])
    return abstract

  items = {"params": ocp.args.StandardRestore(target(ck.item_metadata(step, "params")))}
  if ck._has_item(step, "arrays"):
    items["arrays"] = ocp.args.StandardRestore(_abstract(ck.item_metadata(step, "arrays"), first))
  r = _restore_items(ck.manager, ckdir, step, items)
  arrays = r.get("arrays")
  base = None
  if (workdir / BASE_DIR).exists():
    ckptr = ocp.StandardCheckpointer()
    try:
      bmd = ckptr.metadata(workdir / BASE_DIR)
      bmd = getattr(bmd, "item_metadata", bmd)
      base = ckptr.restore(workdir / BASE_DIR, target(getattr(bmd, "tree", bmd)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointReadError(f"{workdir / BASE_DIR}: the run's base variables cannot be read "
                                f"({type(e).__name__}: {e})", directory=workdir, item=BASE_DIR) from e
    finally:
      ckptr.close()
  return LoadedCheckpoint(variables=merge_variables(r["params"], base), config=cfg, model_config=model_config,
                          model=model, extra=extra, arrays=arrays, step=step, directory=ckdir)
