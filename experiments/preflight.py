"""Check that a paper-setting config can run here, before hours of TPU time: files, architectures, scorers.

    python experiments/preflight.py --config experiments/helpful_assistant.py:policy,ppo \
        --stages sft,adapter,policy,eval [--config.KEY=VALUE ...]

The launch scripts run it first on every worker. Reads only small files (config.json, directory
listings); loads no weights and no data. Checks, for the stages listed:

* data: each source's raw input files under ``data.manual_dir`` (the builder's file layout, see
  docs/data.md), or its prepared directory under ``data.data_dir``;
* the tokenizer directory;
* every ``hf:DIR`` model source the stages load: config.json names an architecture pro_jax imports,
  safetensors weights are present, and the architecture equals the config's ``model`` section (which
  `pro-jax aot` compiled; a mismatch is a warning: the pipeline uses the checkpoint's own);
* every ``hf:DIR=NAME`` scorer (stages adapter, policy, eval): a supported *sequence classifier* with
  one label, safetensors present; the scorers cover every objective;
* with ``--workdir``: a local workdir on a multi-host slice (``--hosts N``, the TPU VM's metadata,
  ``distributed.num_processes`` or a multi-host environment) is an error: the hosts must share one
  ``gs://`` workdir.

Exit code 0 when nothing blocks the run, 1 otherwise (every problem is listed), 2 on a bad config.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any

ARCH_FIELDS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


class Report:
  def __init__(self):
    self.errors: list[str] = []
    self.warnings: list[str] = []
    self.oks: list[str] = []

  def ok(self, msg: str) -> None:
    self.oks.append(msg)

  def error(self, msg: str) -> None:
    self.errors.append(msg)

  def warn(self, msg: str) -> None:
    self.warnings.append(msg)

  def print(self, out=sys.stdout) -> None:
    for m in self.oks:
      print(f"ok       {m}", file=out)
    for m in self.warnings:
      print(f"warning  {m}", file=out)
    for m in self.errors:
      print(f"ERROR    {m}", file=out)


def _hf_model(directory: str, what: str, report: Report, *, classifier: bool) -> Any:
  """The checkpoint's ModelConfig (None when it cannot be used), with problems reported."""
  from pro_jax.models.encoders import ENCODER_ARCHITECTURES, ENCODER_MODEL_TYPES, hf_config_to_encoder_config
  from pro_jax.models.hf_config import (SUPPORTED_ARCHITECTURES, hf_architecture, hf_config_to_model_config,
                                        read_hf_config)
  if not os.path.isdir(directory):
    report.error(f"{what}: {directory} does not exist (download it on an online machine: docs/experiments.md)")
    return None
  try:
    hf = read_hf_config(directory)
  except Exception as e:  # noqa: BLE001
    report.error(f"{what}: {directory}/config.json: {e}")
    return None
  archs = hf.get("architectures") or []
  if classifier and (hf.get("model_type") in ENCODER_MODEL_TYPES or set(archs) & set(ENCODER_ARCHITECTURES)):
    try:  # DistilBERT / BART classifiers score through encoder_reward_scorer (RiC's humor / faithfulness calls)
      ecfg = hf_config_to_encoder_config(hf, source=f"{directory}/config.json")
    except Exception as e:  # noqa: BLE001
      report.error(f"{what}: {e}")
      return None
    if not glob.glob(os.path.join(directory, "*.safetensors")):
      report.error(f"{what}: {directory} has no *.safetensors weights (convert them, docs/experiments.md)")
    else:
      report.ok(f"{what}: {directory} ({archs[0] if archs else ecfg.arch}, an encoder classifier scored with "
                "pro_jax.encoder_reward_scorer)")
    return ecfg
  try:
    arch = hf_architecture(hf, f"{directory}/config.json")
  except Exception:  # noqa: BLE001
    report.error(f"{what}: {directory} is a {'/'.join(archs) or hf.get('model_type')!r} checkpoint, which pro_jax "
                 f"does not import (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}); see "
                 "docs/experiments.md for what to do")
    return None
  try:
    mcfg, _ = hf_config_to_model_config(hf, source=f"{directory}/config.json")
  except Exception as e:  # noqa: BLE001
    report.error(f"{what}: {e}")
    return None
  if classifier and mcfg.head != "score":
    report.error(f"{what}: {directory} is a {arch}, not a sequence classifier (a reward model needs its score head)")
    return None
  if classifier and mcfg.num_labels != 1:
    report.error(f"{what}: {directory} has {mcfg.num_labels} score labels; one objective needs one (or pick a label "
                 "with pro_jax.hf_reward_scorer(heads=...) in your own code)")
  if not glob.glob(os.path.join(directory, "*.safetensors")):
    others = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin"))]
    report.error(f"{what}: {directory} has no *.safetensors weights" + (
        f" (found {others}: convert them, docs/experiments.md)" if others else ""))
  else:
    report.ok(f"{what}: {directory} ({arch}, {mcfg.num_params():,} params)")
  return mcfg


def check(cfg: Any, stages: list[str]) -> Report:
  from pro_jax.data import sources as data_sources
  from pro_jax.data.builders.common import split_files
  from pro_jax.train.config import model_config_from
  r = Report()
  d = cfg.data
  # data
  for spec in list(d.sources) + list(d.eval_sources):
    if spec == "synthetic":
      continue
    name, _, split = spec.rpartition(":")
    try:
      _, bcfg = data_sources.resolve(name)
      if d.data_dir:
        builder, _, config = name.partition("/")
        path = os.path.join(os.path.expanduser(d.data_dir), builder, config)
        if not os.path.isdir(path):
          raise FileNotFoundError(f"no prepared data at {path} (sources.build, docs/data.md)")
        r.ok(f"data {spec}: prepared in {path}")
      else:
        files = split_files(os.path.expanduser(d.manual_dir), bcfg.files, [split])[split]
        r.ok(f"data {spec}: {len(files)} file(s) under {d.manual_dir}")
    except Exception as e:  # noqa: BLE001
      r.error(f"data {spec}: {e}")
  # tokenizer
  if cfg.tokenizer:
    tok = os.path.expanduser(cfg.tokenizer)
    if os.path.isdir(tok) and any(os.path.exists(os.path.join(tok, f)) for f in
                                  ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
      r.ok(f"tokenizer: {tok}")
    elif os.path.isfile(tok) and tok.endswith(".model"):
      r.ok(f"tokenizer: {tok}")
    else:
      r.error(f"tokenizer: {tok} holds no tokenizer files (tokenizer.json / tokenizer.model)")
  # model sources of the stages
  want = model_config_from(cfg.model.to_dict()) if cfg.model.vocab_size else None
  used = []
  if "sft" in stages:
    used.append(("sft.pro.source", cfg.sft.pro.source))
  if "rm" in stages:
    used.append(("rm.pro.source", cfg.rm.pro.source))
  if "adapter" in stages:
    used.append(("adapter.pro.backbone", cfg.adapter.pro.backbone))
  if "policy" in stages:
    used += [("policy.pro.init", cfg.policy.pro.init), ("policy.pro.reference", cfg.policy.pro.reference)]
  for what, src in used:
    kind, _, path = str(src).partition(":")
    if kind == "hf":
      mcfg = _hf_model(os.path.expanduser(path), what, r, classifier=False)
      if mcfg is not None and want is not None:
        diff = [f"{f} {getattr(mcfg, f)} (config: {getattr(want, f)})" for f in ARCH_FIELDS
                if getattr(mcfg, f if f != "n_kv_heads" else "kv_heads") != getattr(want, f if f != "n_kv_heads" else "kv_heads")]
        if diff:
          r.warn(f"{what}: the checkpoint's architecture differs from the config's model section, which "
                 f"`pro-jax aot` sized: {', '.join(diff)}")
    elif kind == "stage" and path not in stages:
      r.ok(f"{what}: {src} (an earlier run of `pro-jax {path}` in the same workdir)")
  # scorers
  if any(s in stages for s in ("adapter", "policy", "eval")):
    have = []
    for spec in cfg.scorers:
      if spec.startswith("hf:"):
        path, _, name = spec[3:].rpartition("=")
        have.append(name)
        _hf_model(os.path.expanduser(path), f"scorer {name}", r, classifier=True)
      elif spec == "rm":
        have += list(cfg.rm.pro.objectives) or list(cfg.objectives)
        r.ok("scorer rm: the rm stage's reward model" + ("" if "rm" in stages else " (from an earlier `pro-jax rm`)"))
      elif spec == "synthetic":
        have += list(cfg.objectives)
      else:
        r.error(f"scorer {spec!r}: expected synthetic, rm or hf:DIR=OBJECTIVE")
    missing = [o for o in cfg.objectives if o not in have]
    if missing:
      r.error(f"no scorer gives objective(s) {missing} (scorers give {have})")
  return r


def tpu_worker_count() -> int:
  """Workers of this TPU VM's slice from the GCE metadata server (1 when not on a TPU VM / unknown)."""
  if not (os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")):
    return 1
  import urllib.request

  url = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints"
  try:
    req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=2) as r:
      return max(1, len([e for e in r.read().decode().split(",") if e.strip()]))
  except Exception:  # noqa: BLE001 (no metadata server: not a Cloud TPU VM)
    return 1


def check_workdir(cfg: Any, workdir: str, hosts: int, report: Report) -> None:
  """A multi-host run needs one shared workdir: refuse a local path (each host would write its own)."""
  from pro_jax.data.files import is_remote
  from pro_jax.sharding import _multihost_env

  n = max(hosts, int(cfg.distributed.num_processes) if "distributed" in cfg else 1)
  multi = n > 1 or _multihost_env()
  if is_remote(workdir):
    report.ok(f"workdir {workdir}")
  elif multi:
    report.error(f"workdir {workdir} is local, but this is a multi-host run ({n if n > 1 else 'several'} hosts): "
                 "every host would write its own checkpoints; use a gs://BUCKET/PATH workdir (docs/tpu.md)")
  else:
    report.warn(f"workdir {workdir} is local: lost with the VM (use gs:// on a TPU VM)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="CONFIG_FILE[:ARG], e.g. experiments/helpful_assistant.py:policy,ppo")
  parser.add_argument("--stages", default="sft,rm,adapter,policy,eval", help="comma-separated stages to check for")
  parser.add_argument("--workdir", default="", help="the run's workdir: must be gs:// on a multi-host slice")
  parser.add_argument("--hosts", type=int, default=0,
                      help="hosts of the slice (default: from the TPU VM's metadata, else 1)")
  args, overrides = parser.parse_known_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pro_jax.configs import ConfigError, load_config
  try:
    cfg = load_config(args.config, overrides)
  except ConfigError as e:
    print(f"preflight: error: {e}", file=sys.stderr)
    return 2
  stages = [s for s in args.stages.split(",") if s]
  report = check(cfg, stages)
  if args.workdir:
    check_workdir(cfg, args.workdir, args.hosts or tpu_worker_count(), report)
  print(f"preflight of {args.config} for stages {','.join(stages)}:")
  report.print()
  if report.errors:
    print(f"preflight: {len(report.errors)} problem(s); nothing was run", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
