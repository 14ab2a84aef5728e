"""Model FLOPs per step and MFU (model FLOPs utilization), after the PaLM paper (Chowdhery et al.
2022, appendix B): model FLOPs per token are 2 x (parameters in matmuls) + attention for a forward
pass, 3x that for a training step (forward + backward); see `model_flops_per_step` and docs/tpu.md
("Throughput and MFU").
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

# Dense bf16 matmul peak FLOP/s per JAX device. TPU v4 / v5e / v5p / v6e: one device = one chip.
# TPU v2 / v3: one device = one TensorCore (half a chip). GPUs: SXM dense tensor-core peaks (no
# sparsity); the H100 PCIe card is slower. Sources: Cloud TPU system-architecture pages, NVIDIA
# data sheets.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    # Order matters: the first pattern found in the lower-cased device kind wins.
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5litepod", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 61.5e12),
    ("tpu v2", 22.5e12),
    ("h100 pcie", 756e12),
    ("h200", 989e12), ("gh200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Peak dense matmul FLOP/s of one device of kind `device_kind` (`jax.devices()[0].device_kind`).

  dtype "bfloat16" / "float16": the table above. "float32": on TPUs the same value (XLA runs f32
  matmuls on the bf16 MXU at default precision); on GPUs None (depends on TF32 settings).
  Unknown devices and CPUs: None (use `measure_cpu_matmul_peak` for a CPU "peak").
  """
  kind = device_kind.lower()
  try:
    dtype = np.dtype(dtype).name
  except TypeError:
    dtype = str(dtype)
  dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
  if dtype not in ("bfloat16", "float16", "float32"):
    return None
  if "cpu" in kind:
    return None
  for pattern, value in _PEAK_BF16:
    if pattern in kind:
      is_tpu = not any(g in pattern for g in ("h100", "h200", "a100"))
      if dtype == "float32" and not is_tpu:
        return None
      return value
  return None


def measure_cpu_matmul_peak(seconds: float = 1.0, n: int = 1024, dtype: Any = np.float32) -> float:
  """Achieved FLOP/s of an n x n x n jitted matmul on the default device, timed for ~`seconds`.

  Used as the "peak" for CPU MFU numbers (so CPU MFU reads "fraction of what this host's matmul
  reaches", not a hardware peak).
  """
  if n <= 0 or seconds <= 0:
    raise ValueError(f"measure_cpu_matmul_peak: n and seconds must be positive, got {n}, {seconds}")
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), dtype=dtype)
  b = jax.random.normal(key_b, (n, n), dtype=dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()  # compile + warm up
  iters, t0 = 0, time.perf_counter()
  while True:
    matmul(a, b).block_until_ready()
    iters += 1
    elapsed = time.perf_counter() - t0
    if elapsed >= seconds:
      break
  return 2.0 * n ** 3 * iters / elapsed


def model_flops_per_step(model_config, tokens_per_step: int, seq_len: int, backward: bool = True,
                         extra_forward_tokens: int = 0) -> float:
  """Model FLOPs of one step (PaLM appendix B).

  forward FLOPs/token F = `model_config.flops_per_token(seq_len)` = 2 N + 4 L H Q T
  (N parameters in matmuls, L layers, H heads, Q head dim, T sequence length).
  A training step costs 3 F per token (forward + backward = 6 N + 12 L H Q T); a forward-only step
  F. `extra_forward_tokens` counts tokens through a frozen forward pass of the same architecture
  (e.g. the reference policy of DPO-type losses): F each.
  """
  if tokens_per_step < 0 or extra_forward_tokens < 0 or seq_len <= 0:
    raise ValueError("model_flops_per_step: tokens must be >= 0 and seq_len > 0, got "
                     f"{tokens_per_step}, {extra_forward_tokens}, {seq_len}")
  fwd = float(model_config.flops_per_token(seq_len))
  return (3.0 if backward else 1.0) * fwd * tokens_per_step + fwd * extra_forward_tokens


def mfu(flops_per_step: float, seconds_per_step: float, n_devices: int,
        peak_flops_per_device: float | None) -> float | None:
  """Model FLOPs utilization: achieved model FLOP/s over the devices' peak; None without a peak."""
  if peak_flops_per_device is None:
    return None
  if seconds_per_step <= 0 or n_devices <= 0 or peak_flops_per_device <= 0:
    raise ValueError(f"mfu: seconds_per_step, n_devices and peak must be positive, got "
                     f"{seconds_per_step}, {n_devices}, {peak_flops_per_device}")
  return flops_per_step / seconds_per_step / (n_devices * peak_flops_per_device)
