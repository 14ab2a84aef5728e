"""What the side-by-side benchmarks share: the worker environment, the CPU's name, running one
framework's worker in its own interpreter, and appending a result to benchmarks/results/.

The scripts import it as a sibling module (`python benchmarks/bench_x.py` puts benchmarks/ on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def thread_env(threads: int) -> dict[str, str]:
  """The environment of a worker process: `threads` BLAS / OpenMP threads, JAX on the CPU with one
  device (no fake devices), offline Hub, the repository importable."""
  env = dict(os.environ)
  for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[k] = str(threads)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["TOKENIZERS_PARALLELISM"] = "false"
  env["HF_HUB_OFFLINE"] = "1"
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def cpu_model() -> str:
  """'AMD EPYC ..., cpu family 26 (avx512f, avx512_bf16)' from /proc/cpuinfo (every speed figure
  names its CPU; the ISA says whether bf16 matmuls have hardware support)."""
  fields = {}
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      k, _, v = line.partition(":")
      fields.setdefault(k.strip(), v.strip())
  except OSError:
    pass
  flags = fields.get("flags", "").split()
  isa = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no AVX-512"
  return f"{fields.get('model name', platform.processor())}, cpu family {fields.get('cpu family', '?')} ({isa})"


def spawn_worker(script: str, python: str, worker: str, spec: dict, workdir: Path, threads: int,
                 timeout: float) -> dict:
  """Run `python script --worker WORKER --spec FILE` (one framework in its own interpreter / venv) and
  return the JSON it wrote, with `wall_s`; {"error": ...} with the log's tail when it failed."""
  out = workdir / f"{worker}_{time.time_ns()}.json"
  spec_path = workdir / f"spec_{worker}.json"
  spec_path.write_text(json.dumps(dict(spec, out=str(out))))
  log = workdir / f"{worker}.log"
  cmd = [python, str(Path(script).resolve()), "--worker", worker, "--spec", str(spec_path)]
  t0 = time.perf_counter()
  with open(log, "a") as f:
    proc = subprocess.run(cmd, env=thread_env(threads), stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                          cwd=str(REPO))
  if proc.returncode != 0 or not out.exists():
    tail = "\n".join(log.read_text().splitlines()[-25:])
    return {"error": f"{worker} exited with {proc.returncode}; last lines of {log}:\n{tail}"}
  result = json.loads(out.read_text())
  result["wall_s"] = time.perf_counter() - t0
  return result


def append_report(results_dir: str | os.PathLike, prefix: str, command: str, header: str, lines: list[str],
                  details: str = "") -> Path:
  """Append one dated run (the command, the header with the CPU, the table lines) to
  RESULTS_DIR/PREFIX_<date>.md and return that path."""
  out_dir = Path(results_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc)
  path = out_dir / f"{prefix}_{stamp:%Y-%m-%d}.md"
  with open(path, "a") as fh:
    fh.write(f"## {stamp:%Y-%m-%d %H:%M} UTC\n\n`{command.strip()}`\n\n```\n{header}\n```\n\n" + "\n".join(lines) +
             "\n\n" + (details + "\n\n" if details else ""))
  return path
