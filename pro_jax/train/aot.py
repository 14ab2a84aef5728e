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
  (`model.scan_layers=True`), with micro-batches (`n_micro > 1`) or with the TPU compiler's
  "windowed einsum" collective matmuls (FSDP all-gathers overlapped with matmuls, emitted as loops)
  is under-priced. So when the configured step has loops, `aot_compile` compiles a second, loop-free
  variant of the same step for the cost figures: layers unrolled, n_micro=1 (same batch, same
  FLOPs) and windowed einsum off (plain all-gather + matmul, which the cost model prices fully).
  Memory figures always come from the step as configured;
* model FLOPs per step (PaLM convention, `pro_jax.train.flops.model_flops_per_step`) and the MFU
  they imply: model FLOPs / (optimal_seconds x chips x peak bf16 FLOP/s per chip; v4 275e12,
  v5e 197e12, v5p 459e12, v6e 918e12).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from typing import Any

from pro_jax import sharding as shd
from pro_jax.train.config import validate_config
from pro_jax.train.tasks import build_task
from pro_jax.train.trainer import setup

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
  n_chips: int  # JAX devices (= chips, except v4 topologies, which list each TensorCore)
  device_kind: str
  mesh_shape: dict
  hbm_bytes: int  # per device (a v4 TensorCore device gets half its chip's 32 GiB)
  # per-chip memory of the step AS CONFIGURED
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int
  fits: bool
  while_loops: int  # loops in the configured step
  # XLA's cost model, of `cost_program`
  cost_program: str  # "as configured" or the loop-free variant's description
  optimal_seconds: float | None  # raw + unknown_cost_ops
  optimal_seconds_raw: float | None
  unknown_cost_ops: int  # ConcatBitcast custom calls, each priced -1 s by the cost model
  cost_while_loops: int  # loops left in the costed program (0 = every op priced)
  xla_flops: float | None
  bytes_accessed: float | None
  model_flops: float | None
  mfu: float | None
  compile_seconds: float
  cost_program_total_bytes: int | None = None  # per-chip memory of the loop-free variant (information)
  compile_error: str | None = None  # the TPU compiler's own out-of-memory message

  def table(self) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:8.2f} MiB"
    head = f"topology            {self.topology} ({self.n_chips} devices: {self.device_kind}), mesh {self.mesh_shape}"
    if self.compile_error is not None:
      return "\n".join([
          head, f"per-device HBM      needs {g(self.total_bytes)} of {self.hbm_bytes / GIB:.0f} GiB -> DOES NOT FIT",
          f"  the TPU compiler: {self.compile_error}",
          f"model FLOPs / step  {self.model_flops:.4g}" if self.model_flops else "model FLOPs / step  n/a",
          f"compile time        {self.compile_seconds:.1f} s"])
    lines = [
        head,
        "per-device HBM (memory_analysis of the step as configured)",
        f"  arguments         {g(self.argument_bytes)}",
        f"  outputs           {g(self.output_bytes)}",
        f"  aliased (donated) {g(self.alias_bytes)}",
        f"  temporaries       {g(self.temp_bytes)}",
        f"  generated code    {g(self.code_bytes)}",
        f"  total             {g(self.total_bytes)} of {self.hbm_bytes / GIB:.0f} GiB "
        f"({100 * self.total_bytes / self.hbm_bytes:.1f}%) -> {'FITS' if self.fits else 'DOES NOT FIT'}",
        f"XLA cost model (cost_analysis per device, {self.cost_program})",
    ]
    if self.optimal_seconds is None:
      lines.append("  optimal_seconds   n/a")
    else:
      lines.append(f"  optimal_seconds   {self.optimal_seconds:.4g} s  (raw {self.optimal_seconds_raw:.6g} + "
                   f"{self.unknown_cost_ops} ConcatBitcast ops priced -1 s each)")
    lines += [
        f"  flops             {self.xla_flops:.4g}" if self.xla_flops else "  flops             n/a",
        f"  bytes accessed    {self.bytes_accessed:.4g}" if self.bytes_accessed else "  bytes accessed    n/a",
        f"model FLOPs / step  {self.model_flops:.4g}" if self.model_flops else "model FLOPs / step  n/a",
        f"MFU (cost model)    {100 * self.mfu:.1f}%" if self.mfu is not None else "MFU (cost model)    n/a",
    ]
    if self.cost_while_loops:
      lines.append(f"  NOTE: the costed program still has {self.cost_while_loops} while loop(s); the cost model "
                   "counts a loop body once, so optimal_seconds and MFU are NOT meaningful")
    if self.cost_program_total_bytes is not None:
      lines.append(f"  (the loop-free variant itself needs {g(self.cost_program_total_bytes).strip()} per device)")
    lines.append(f"compile time        {self.compile_seconds:.1f} s")
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


# Loop-free variant for the cost model: no windowed-einsum collective matmul loops.
COST_MODEL_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                               "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
COST_VARIANT = "loop-free variant: layers unrolled, n_micro=1, windowed einsum off"


def _compile(cfg: Any, task: Any, devices: list, options: dict | None) -> dict:
  """Compile one step; a dict of figures, or {"error": msg, "total": bytes} when HBM runs out."""
  mesh = shd.mesh_from_config(cfg.mesh, devices=devices)
  su = setup(cfg, task, mesh)
  t0 = time.perf_counter()
  lowered = su.step.lower(su.abstract_state, su.frozen_abstract, su.batch_abstract)
  out: dict[str, Any] = {"mesh_shape": dict(mesh.shape)}
  try:
    compiled = lowered.compile(compiler_options=options or None)
  except Exception as e:  # noqa: BLE001
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # "... total memory required for HLO temporaries (44.20G) exceeds available HBM (15.75G)"
    msg = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    need = re.search(r"\(([\d.]+)([KMGT])\)", msg)
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    out.update(error=msg, total=int(float(need.group(1)) * scale[need.group(2)]) if need else 0,
               seconds=time.perf_counter() - t0)
    return out
  out["seconds"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  out.update(arg=int(mem.argument_size_in_bytes), out=int(mem.output_size_in_bytes),
             alias=int(mem.alias_size_in_bytes), temp=int(mem.temp_size_in_bytes),
             code=int(getattr(mem, "generated_code_size_in_bytes", 0) or 0))
  out["total"] = out["arg"] + out["out"] - out["alias"] + out["temp"] + out["code"]
  cost = compiled.cost_analysis()
  hlo = compiled.as_text()
  out.update(raw=_first(cost, "optimal_seconds"), unknown=hlo.count('custom_call_target="ConcatBitcast"'),
             loops=len(re.findall(r"\swhile\(", hlo)), flops=_first(cost, "flops"),
             bytes=_first(cost, "bytes accessed"))
  return out


def _variant(cfg: Any, n_layers: int | None = None) -> Any:
  vcfg = copy.deepcopy(cfg)
  with vcfg.unlocked():
    vcfg.model.scan_layers = False
    vcfg.n_micro = 1
    if n_layers is not None:
      vcfg.model.n_layers = n_layers
  return vcfg


EXTRAPOLATE_FROM = (2, 4)  # layer counts of the two loop-free compiles a deep model's cost is fitted on


def _loop_free_cost(cfg: Any, task_fn: Any, devices: list) -> tuple[dict, str, float, int | None]:
  """Cost figures of the loop-free variant: compiled directly for shallow models; for deep ones
  (more than 4 layers) fitted as a + b * n_layers on 2- and 4-layer variants (every layer is the same
  program, so the cost is linear in the layer count; checked against a full 32-layer compile in
  docs/training.md), since the full unrolled program compiles slowly and may not fit in HBM itself."""
  n = int(cfg.model.n_layers)
  if n <= max(EXTRAPOLATE_FROM):
    v = _compile(_variant(cfg), task_fn(_variant(cfg)), devices, COST_MODEL_COMPILER_OPTIONS)
    if "error" in v:
      return None, f"n/a: the loop-free variant does not fit ({v['error']})", v["seconds"], None
    return v, COST_VARIANT, v["seconds"], v["total"]
  lo, hi = EXTRAPOLATE_FROM
  runs = []
  for k in (lo, hi):
    vcfg = _variant(cfg, k)
    v = _compile(vcfg, task_fn(vcfg), devices, COST_MODEL_COMPILER_OPTIONS)
    if "error" in v:
      return None, f"n/a: the {k}-layer loop-free variant does not fit ({v['error']})", v["seconds"], None
    runs.append(v)
  fit = lambda a, b: a + (b - a) / (hi - lo) * (n - lo)
  out = {"raw": fit(runs[0]["raw"], runs[1]["raw"]), "unknown": round(fit(runs[0]["unknown"], runs[1]["unknown"])),
         "loops": runs[0]["loops"] + runs[1]["loops"], "flops": fit(runs[0]["flops"], runs[1]["flops"]),
         "bytes": fit(runs[0]["bytes"], runs[1]["bytes"])}
  desc = f"{COST_VARIANT}; fitted a + b * n_layers on {lo}- and {hi}-layer compiles, evaluated at {n} layers"
  return out, desc, runs[0]["seconds"] + runs[1]["seconds"], None


def aot_compile(cfg: Any, topology: str, task_fn: Any = None, *, cost_variant: bool = True) -> AotReport:
  """Compile the train step of `cfg` for `topology` (see the module docstring).

  task_fn: `cfg -> Task` (default `pro_jax.train.tasks.build_task`); stages pass their own.
  cost_variant: when the configured step has loops, also compile the loop-free variant for the
  cost-model figures.
  """
  if task_fn is None:
    task_fn = build_task
  gen = chip_generation(topology)
  devices = topology_devices(topology)
  # v4 topologies list one device per TensorCore (2 per chip): each has half the chip's HBM and peak.
  chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
  per_chip = max(len(devices) // max(chips, 1), 1)
  hbm, peak = HBM_BYTES[gen] // per_chip, PEAK_BF16[gen] / per_chip
  validate_config(cfg, num_devices=len(devices))
  task = task_fn(cfg)
  main = _compile(cfg, task, devices, None)
  kind = devices[0].device_kind + (f", {chips} chips x {per_chip} TensorCores" if per_chip > 1 else "")
  common = dict(topology=topology, n_chips=len(devices), device_kind=kind,
                mesh_shape=main["mesh_shape"], hbm_bytes=hbm, model_flops=task.flops_per_step)
  if "error" in main:
    return AotReport(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0, code_bytes=0,
                     total_bytes=main["total"], fits=False, while_loops=0, cost_program="n/a",
                     optimal_seconds=None, optimal_seconds_raw=None, unknown_cost_ops=0, cost_while_loops=0,
                     xla_flops=None, bytes_accessed=None, mfu=None, compile_seconds=main["seconds"],
                     compile_error=main["error"], **common)
  cost, program, seconds, variant_total = main, "as configured", main["seconds"], None
  if cost_variant and main["loops"]:
    cost, program, vsec, variant_total = _loop_free_cost(cfg, task_fn, devices)
    seconds += vsec
  if cost is None:  # the cost variant could not be compiled: memory figures only
    cost = {"raw": None, "unknown": 0, "loops": 0, "flops": None, "bytes": None}
  opt_s = cost["raw"] + cost["unknown"] if cost["raw"] is not None else None
  flops = task.flops_per_step
  mfu = flops / (opt_s * len(devices) * peak) if flops and opt_s and opt_s > 0 else None
  return AotReport(argument_bytes=main["arg"], output_bytes=main["out"], alias_bytes=main["alias"],
                   temp_bytes=main["temp"], code_bytes=main["code"], total_bytes=main["total"],
                   fits=main["total"] <= hbm, while_loops=main["loops"], cost_program=program,
                   optimal_seconds=opt_s, optimal_seconds_raw=cost["raw"], unknown_cost_ops=cost["unknown"],
                   cost_while_loops=cost["loops"], xla_flops=cost["flops"], bytes_accessed=cost["bytes"], mfu=mfu,
                   compile_seconds=seconds, cost_program_total_bytes=variant_total, **common)
