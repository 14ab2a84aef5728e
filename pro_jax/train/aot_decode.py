"""The rollout decode step compiled for a Cloud TPU topology: HBM-bandwidth figures from XLA's cost model.

Generation (`pro_jax.models.generate`) spends its time in one decode step per new token: every layer's
weights and the KV cache so far are read to produce one token per row, so the step is bound by memory
traffic, not FLOPs, and MFU is the wrong yardstick. `aot_decode` compiles that step (`generate._decode_step`:
per-layer weights, per-layer caches of length `cache_len`, one token per row, the loop body of
`generate`) with the shardings a PPO rollout gives it (the policy's variables as the train state holds
them, FSDP over the mesh; rows over the batch axes) and reports, per chip:

* `bytes_accessed` and `optimal_seconds` of XLA's cost model (the -1 s `ConcatBitcast` markers added
  back, as in `pro_jax.train.aot`), and the bandwidth they imply (bytes / seconds) against the chip's
  HBM bandwidth (v4 1200, v5e 819, v5p 2765, v6e 1640 GB/s);
* the model bandwidth utilization (MBU): the bytes a decode step must read at the least -- every
  weight once in the compute dtype plus the KV cache, divided over the chips that share them -- per
  `optimal_seconds`, against that bandwidth. Under FSDP each chip streams the all-gathered weights of
  every layer (the whole model, not its shard) for a few rows, which is what these figures price.

These are estimates of a cost model, not measurements (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pro_jax import sharding as shd
from pro_jax.models.config import ModelConfig
from pro_jax.models.generate import _decode_step
from pro_jax.models.transformer import BATCH, KV_HEADS, Transformer, abstract_variables, logical_axes
from pro_jax.train.aot import HBM_BYTES, _first, chip_generation, topology_devices

GB = 1e9
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}  # bytes/s per chip


@dataclasses.dataclass
class DecodeReport:
  topology: str
  n_chips: int  # JAX devices (= chips, except v4 topologies: TensorCores)
  mesh_shape: dict
  batch: int  # rows decoded per step (the whole slice)
  cache_len: int  # KV-cache slots (prompt + new tokens)
  weight_bytes: float  # every weight once, in the compute dtype (whole model)
  cache_bytes: float  # the KV cache (whole slice)
  total_bytes: int  # per-chip HBM of the step (memory_analysis)
  hbm_bytes: int  # per device
  optimal_seconds: float
  bytes_accessed: float  # per device, cost model
  xla_flops: float
  bandwidth: float  # bytes_accessed / optimal_seconds
  peak_bandwidth: float  # HBM bytes/s per device
  mbu: float  # (weight_bytes + cache_bytes) / n_chips / optimal_seconds / peak_bandwidth
  compile_seconds: float

  def table(self) -> str:
    return "\n".join([
        f"decode step         {self.topology} ({self.n_chips} chips), mesh {self.mesh_shape}: {self.batch} rows, "
        f"KV cache of {self.cache_len} slots",
        f"per-device HBM      {self.total_bytes / 2**30:.2f} of {self.hbm_bytes / 2**30:.0f} GiB",
        f"XLA cost model      optimal_seconds {1e3 * self.optimal_seconds:.3f} ms, bytes accessed "
        f"{self.bytes_accessed / GB:.3f} GB, flops {self.xla_flops:.4g} (per chip)",
        f"HBM bandwidth       {self.bandwidth / GB:.0f} GB/s of {self.peak_bandwidth / GB:.0f} GB/s "
        f"({100 * self.bandwidth / self.peak_bandwidth:.1f}%: XLA's bytes accessed / its time)",
        f"MBU (cost model)    {100 * self.mbu:.1f}% (weights {self.weight_bytes / GB:.2f} GB in the compute dtype + "
        f"KV cache {self.cache_bytes / GB:.3f} GB, over {self.n_chips} chips, per step)",
        f"tokens/s (slice)    {self.batch / self.optimal_seconds:.0f} ({1e3 * self.optimal_seconds:.2f} ms per token "
        "per row)",
        f"compile time        {self.compile_seconds:.1f} s"])

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


def _drop_layer_axis(s: NamedSharding) -> NamedSharding:
  spec = tuple(s.spec)
  return NamedSharding(s.mesh, P(*spec[1:]))


def aot_decode(mcfg: ModelConfig, topology: str, mesh_cfg: Any, *, batch: int, cache_len: int,
               rules: Any = None) -> DecodeReport:
  """Compile one decode step of `mcfg` (variables stored in `mcfg.param_dtype`, compute in `mcfg.dtype`)
  for `topology` with `batch` rows and a KV cache of `cache_len` slots (see the module docstring)."""
  gen = chip_generation(topology)
  devices = topology_devices(topology)
  # v4 topologies list one device per TensorCore (2 per chip), each with half the chip's HBM and bandwidth
  chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
  per_chip = max(len(devices) // max(chips, 1), 1)
  mesh = shd.mesh_from_config(mesh_cfg, devices=devices)
  model = Transformer(mcfg)
  abstract = abstract_variables(model)
  var_sh = shd.param_shardings(logical_axes(model), abstract, mesh, rules)
  stacked = {c: t["layers"] for c, t in abstract.items() if "layers" in t}
  stacked_sh = {c: t["layers"] for c, t in var_sh.items() if "layers" in t}
  layer_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)
  layer_sh = jax.tree.map(_drop_layer_axis, stacked_sh)
  rules_m = shd.rules_for_mesh(mesh, rules)
  cache_spec = shd.fit_spec(shd.logical_to_mesh_spec(P(BATCH, None, KV_HEADS, None), rules_m),
                            (batch, cache_len, mcfg.kv_heads, mcfg.hd), mesh)
  cache_sh = NamedSharding(mesh, cache_spec)
  row2_sh = NamedSharding(mesh, shd.fit_spec(P(shd.batch_axes(mesh, rules), None), (batch, 1), mesh))
  cache_abs = jax.ShapeDtypeStruct((batch, cache_len, mcfg.kv_heads, mcfg.hd), mcfg.jnp_dtype)
  L = mcfg.n_layers

  def step(variables, layer_vars, caches, tokens_Bx1, positions_Bx1, cache_index, cache_mask_BxT):
    logits_BxV, caches = _decode_step(mcfg, variables, layer_vars, caches, tokens_Bx1, positions_Bx1, cache_index,
                                      cache_mask_BxT)
    return jnp.argmax(logits_BxV, axis=-1), caches

  def with_sh(a, s):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

  # the non-layer variables (embedding, final norm, head) as the generator gets them; the layer stacks
  # are passed split, one tree per layer (what generate's loop body reads)
  top_abs = {c: {k: v for k, v in t.items() if k != "layers"} for c, t in abstract.items()}
  top_sh = {c: {k: v for k, v in t.items() if k != "layers"} for c, t in var_sh.items()}
  args = (jax.tree.map(with_sh, top_abs, top_sh),
          [jax.tree.map(with_sh, layer_abs, layer_sh) for _ in range(L)],
          [{"k": with_sh(cache_abs, cache_sh), "v": with_sh(cache_abs, cache_sh)} for _ in range(L)],
          jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=row2_sh),
          jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=row2_sh),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
          jax.ShapeDtypeStruct((batch, cache_len), jnp.int32, sharding=row2_sh))
  t0 = time.perf_counter()
  with shd.activation_sharding(mesh, rules), nn.logical_axis_rules(rules_m):
    lowered = jax.jit(step, donate_argnums=(2,)).lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + (getattr(mem, "generated_code_size_in_bytes", 0) or 0))
  cost = compiled.cost_analysis()
  hlo = compiled.as_text()
  raw = _first(cost, "optimal_seconds")
  opt = raw + hlo.count('custom_call_target="ConcatBitcast"') if raw is not None else None
  if opt is None or opt <= 0:
    raise RuntimeError(f"XLA's cost model gave no usable time for the decode step (optimal_seconds {raw})")
  if re.search(r"\swhile\(", hlo):  # windowed-einsum loops would be priced once (pro_jax.train.aot)
    raise RuntimeError("the compiled decode step has while loops; its cost-model time would be under-priced")
  bytes_accessed = _first(cost, "bytes accessed") or 0.0
  weight_bytes = float(mcfg.num_params()) * np.dtype(mcfg.jnp_dtype).itemsize
  cache_bytes = 2.0 * L * np.prod(cache_abs.shape) * np.dtype(cache_abs.dtype).itemsize
  peak = HBM_BANDWIDTH[gen] / per_chip
  return DecodeReport(
      topology=topology, n_chips=len(devices), mesh_shape=dict(mesh.shape), batch=batch, cache_len=cache_len,
      weight_bytes=weight_bytes, cache_bytes=cache_bytes, total_bytes=total, hbm_bytes=HBM_BYTES[gen] // per_chip,
      optimal_seconds=opt, bytes_accessed=bytes_accessed, xla_flops=_first(cost, "flops") or 0.0,
      bandwidth=bytes_accessed / opt, peak_bandwidth=peak,
      mbu=(weight_bytes + cache_bytes) / len(devices) / opt / peak, compile_seconds=seconds)
