"""Ahead-of-time compilation of the real train step for a Cloud TPU topology, on any host.

`pro-jax aot --config CONFIG --topology v5e:4x4` builds the step exactly as `train` would
(`trainer.setup`), but from abstract shapes: `jax.experimental.topologies.get_topology_desc`
gives the TPU topology's devices (needs `jax[tpu]`, i.e. libtpu, installed; no TPU, no weights),
the mesh is built over them, the step is lowered with ShapeDtypeStructs carrying NamedShardings and
compiled by the TPU compiler. The report:

* per-chip HBM (`compiled.memory_analysis()`): arguments, outputs, temporaries, aliased (donated)
  bytes, and the total = arguments + outputs - aliased + temporaries + generated code, against the
  chip's HBM (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB);
* XLA's cost model (`compiled.cost_analysis()`): `optimal_seconds` (its estimate of the step's
  time on one chip), `flops`, `bytes accessed`. Two facts about this cost model, found by compiling
  small programs whose answer is known (docs/training.md): (1) it prices each `ConcatBitcast`
  custom call (which the TPU compiler emits when it gathers parameter shards) at -1 second, a
  "don't know" marker that it sums anyway, so the raw total of an FSDP step is negative; the report
  adds those markers back (`optimal_seconds` = raw + their count; `optimal_seconds_raw` keeps the
  raw value); (2) it counts a while-loop body ONCE, so a step whose layers are a scanned loop
  (`model.scan_layers=True`) or with micro-batches (`n_micro > 1`) is under-priced: the report
  flags such steps and their MFU is not meaningful (compile with `--config.model.scan_layers=false
  --config.n_micro=1` for the cost figures);
* model FLOPs per step (PaLM convention, `pro_jax.train.logging.model_flops_per_step`) and the MFU
  they imply: model FLOPs / (optimal_seconds x chips x peak bf16 FLOP/s per chip; v4 275e12,
  v5e 197e12, v5p 459e12, v6e 918e12).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

GIB = 1024 ** 3
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


class AotError(RuntimeError):
  """AOT compilation is unavailable (no libtpu) or the topology is unknown."""


def chip_generation(topology: str) -> str:
  gen = topology.split(":", 1)[0].lower()
  gen = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}.get(gen, gen)
  if gen not in HBM_BYTES:
    raise AotError(f"topology {topology!r}: unknown TPU generation {gen!r}; known: {sorted(HBM_BYTES)} "
                   "(e.g. v5e:4x4, v5p:2x2x2, v4:2x2x2, v6e:4x4)")
  return gen


def libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list[Any]:
  """The (abstract) devices of a TPU topology like "v5e:4x4"."""
  if not libtpu_available():
    raise AotError("AOT compilation for TPUs needs libtpu: pip install 'jax[tpu]==0.10.2' "
                   "(jax keeps running on the CPU)")
  import os
  # libtpu takes /tmp/libtpu_lockfile for the life of any process that initialized it (every JAX
  # process probes the TPU plugin when libtpu is installed); describing a topology needs no TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # noqa: BLE001
    raise AotError(f"cannot describe TPU topology {topology!r}: {e}") from e


@dataclasses.dataclass
class AotReport:
  topology: str
  n_chips: int
  device_kind: str
  mesh_shape: dict
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int
  hbm_bytes: int
  fits: bool
  optimal_seconds: float | None  # raw + unknown_cost_ops
  optimal_seconds_raw: float | None
  unknown_cost_ops: int  # ConcatBitcast custom calls, each priced -1 s by the cost model
  while_loops: int  # loop bodies are counted once by the cost model
  xla_flops: float | None
  bytes_accessed: float | None
  model_flops: float | None
  mfu: float | None
  compile_seconds: float

  def table(self) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"
    lines = [
        f"topology            {self.topology} ({self.n_chips} chips, {self.device_kind}), mesh {self.mesh_shape}",
        "per-chip HBM (memory_analysis)",
        f"  arguments         {g(self.argument_bytes)}",
        f"  outputs           {g(self.output_bytes)}",
        f"  aliased (donated) {g(self.alias_bytes)}",
        f"  temporaries       {g(self.temp_bytes)}",
        f"  generated code    {g(self.code_bytes)}",
        f"  total             {g(self.total_bytes)} of {self.hbm_bytes / GIB:.0f} GiB "
        f"({100 * self.total_bytes / self.hbm_bytes:.1f}%) -> {'FITS' if self.fits else 'DOES NOT FIT'}",
        "XLA cost model (cost_analysis, per chip)",
        f"  optimal_seconds   {self.optimal_seconds if self.optimal_seconds is not None else 'n/a'}"
        f"  (raw {self.optimal_seconds_raw} + {self.unknown_cost_ops} ConcatBitcast ops priced -1 s each)",
        f"  flops             {self.xla_flops:.4g}" if self.xla_flops else "  flops             n/a",
        f"  bytes accessed    {self.bytes_accessed:.4g}" if self.bytes_accessed else "  bytes accessed    n/a",
        f"model FLOPs / step  {self.model_flops:.4g}" if self.model_flops else "model FLOPs / step  n/a",
        f"MFU (cost model)    {100 * self.mfu:.1f}%" if self.mfu is not None else "MFU (cost model)    n/a",
    ]
    if self.while_loops:
      lines.append(f"  NOTE: the step has {self.while_loops} while loop(s) (scanned layers / micro-batches); the cost "
                   "model counts a loop body once, so optimal_seconds and MFU are NOT meaningful. Use "
                   "--config.model.scan_layers=false --config.n_micro=1 for the cost figures.")
    lines += [
        f"compile time        {self.compile_seconds:.1f} s",
    ]
    return "\n".join(lines)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


def _first(d: Any, *keys: str) -> float | None:
  if isinstance(d, (list, tuple)):
    d = d[0] if d else {}
  for k in keys:
    if d and k in d and d[k] is not None:
      return float(d[k])
  return None


def aot_compile(cfg: Any, topology: str, task: Any = None) -> AotReport:
  """Compile the train step of `cfg` (or `task`) for `topology`; see the module docstring."""
  import time

  from pro_jax import sharding as shd
  from pro_jax.train.config import validate_config
  from pro_jax.train.trainer import setup

  gen = chip_generation(topology)
  devices = topology_devices(topology)
  validate_config(cfg, num_devices=len(devices))
  if task is None:
    from pro_jax.train.tasks import build_task
    task = build_task(cfg)
  mesh = shd.mesh_from_config(cfg.mesh, devices=devices)
  su = setup(cfg, task, mesh)
  t0 = time.perf_counter()
  compiled = su.step.lower(su.abstract_state, su.frozen_abstract, su.batch_abstract).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  code = int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
  total = arg + out - alias + temp + code
  cost = compiled.cost_analysis()
  hlo = compiled.as_text()
  raw = _first(cost, "optimal_seconds")
  unknown = hlo.count('custom_call_target="ConcatBitcast"')
  loops = len(re.findall(r"\swhile\(", hlo))
  opt_s = raw + unknown if raw is not None else None
  model_flops = task.flops_per_step
  mfu = model_flops / (opt_s * len(devices) * PEAK_BF16[gen]) if model_flops and opt_s and opt_s > 0 else None
  return AotReport(topology=topology, n_chips=len(devices), device_kind=devices[0].device_kind,
                   mesh_shape=dict(mesh.shape), argument_bytes=arg, output_bytes=out, alias_bytes=alias,
                   temp_bytes=temp, code_bytes=code, total_bytes=total, hbm_bytes=HBM_BYTES[gen],
                   fits=total <= HBM_BYTES[gen], optimal_seconds=opt_s, optimal_seconds_raw=raw,
                   unknown_cost_ops=unknown, while_loops=loops, xla_flops=_first(cost, "flops"),
                   bytes_accessed=_first(cost, "bytes accessed"), model_flops=model_flops, mfu=mfu,
                   compile_seconds=seconds)
