"""Tests for pro_jax.train.logging: JSONL, TensorBoard, W&B hooks, progress bar, MFU."""

import io
import json
import math
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from pro_jax.models.config import ModelConfig
from pro_jax.train import logging as tlog
from pro_jax.train import flops as train_flops


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


# -- JSONL -------------------------------------------------------------------------------------


def test_jsonl_one_line_per_call_flushed_and_converted(tmp_path):
  logger = tlog.MetricsLogger(tmp_path, tensorboard=False, process_index=0)
  logger.log(1, {"loss": jnp.float32(2.5), "acc": np.float64(0.25), "n": np.int32(7),
                 "ok": True, "lr": 1e-3})
  # Flushed line by line: readable before close().
  recs = _lines(tmp_path / "metrics.jsonl")
  assert len(recs) == 1
  rec = recs[0]
  assert rec["step"] == 1
  assert rec["train/loss"] == 2.5 and rec["train/acc"] == 0.25 and rec["train/lr"] == 1e-3
  assert rec["train/n"] == 7 and isinstance(rec["train/n"], int)
  assert rec["train/ok"] == 1
  assert isinstance(rec["time"], float)
  logger.log(2, {"loss": jnp.array([1.5])}, prefix="eval")
  recs = _lines(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in recs] == [1, 2]
  assert recs[1]["eval/loss"] == 1.5 and "train/loss" not in recs[1]
  logger.close()
  with pytest.raises(RuntimeError):
    logger.log(3, {"loss": 1.0})


def test_non_finite_values_are_valid_json(tmp_path):
  with tlog.MetricsLogger(tmp_path, tensorboard=False, process_index=0) as logger:
    logger.log(5, {"a": float("nan"), "b": np.float32(np.inf), "c": -jnp.inf, "d": 1.0})
  text = (tmp_path / "metrics.jsonl").read_text()
  # Strict JSON (no NaN / Infinity tokens).
  rec = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert rec["train/a"] == "nan" and rec["train/b"] == "inf" and rec["train/c"] == "-inf"
  back = tlog.read_metrics(tmp_path)
  assert math.isnan(back[0]["train/a"]) and back[0]["train/b"] == math.inf
  assert back[0]["train/c"] == -math.inf and back[0]["train/d"] == 1.0


def test_bad_metric_values_name_the_key(tmp_path):
  with tlog.MetricsLogger(tmp_path, tensorboard=False, process_index=0) as logger:
    with pytest.raises(ValueError, match="'vec'.*shape"):
      logger.log(1, {"vec": np.ones(3)})
    with pytest.raises(TypeError, match="'name'"):
      logger.log(1, {"name": "hello"})
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resume_truncates_steps_after_the_checkpoint(tmp_path):
  with tlog.MetricsLogger(tmp_path, tensorboard=False, process_index=0) as logger:
    for step in (10, 20, 30, 40):
      logger.log(step, {"loss": float(step)})
  # A torn last line, as left by a preempted process.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 50, "train/lo')
  with tlog.MetricsLogger(tmp_path, tensorboard=False, process_index=0, resume_step=20) as logger:
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [10, 20]
    logger.log(30, {"loss": 3.5})
  recs = _lines(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in recs] == [10, 20, 30]
  assert recs[-1]["train/loss"] == 3.5
  # No resume_step: plain append, nothing dropped.
  with tlog.MetricsLogger(tmp_path, tensorboard=False, process_index=0) as logger:
    logger.log(40, {"loss": 4.0})
  assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [10, 20, 30, 40]
  with pytest.raises(ValueError, match="resume_step"):
    tlog.MetricsLogger(tmp_path, tensorboard=False, process_index=0, resume_step=-1)


def test_only_process_zero_writes(tmp_path):
  with tlog.MetricsLogger(tmp_path / "run", process_index=1) as logger:
    logger.log(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()


def test_read_metrics_rejects_a_corrupt_middle_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    tlog.read_metrics(tmp_path)


# -- TensorBoard -------------------------------------------------------------------------------


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C, written out here (independent of tensorboardX's implementation)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
  """Parse a TFRecord event file: [len u64][crc(len) u32][data][crc(data) u32]..."""
  from tensorboardX.proto import event_pb2

  data, pos, events = path.read_bytes(), 0, []
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert len_crc == _masked_crc32c(data[pos:pos + 8])
    payload = data[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert data_crc == _masked_crc32c(payload)
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
    pos += 16 + length
  return events


def _scalars(tb_dir):
  out, purges = [], []
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    for ev in _read_events(path):
      if ev.HasField("session_log"):
        purges.append(ev.step)
      for v in ev.summary.value:
        if v.HasField("simple_value"):
          out.append((ev.step, v.tag, v.simple_value))
  return out, purges


def test_tensorboard_events_readable(tmp_path):
  with tlog.MetricsLogger(tmp_path, process_index=0, config={"lr": 0.1}) as logger:
    logger.log(1, {"loss": 2.0, "acc": jnp.float32(0.5)})
    logger.log(2, {"loss": 1.0}, prefix="eval")
  scalars, purges = _scalars(tmp_path / "tb")
  assert sorted(scalars) == [(1, "train/acc", 0.5), (1, "train/loss", 2.0), (2, "eval/loss", 1.0)]
  assert purges == []
  # Resume from step 1: a purge marker at step 2 tells TensorBoard to drop the old step-2 events.
  with tlog.MetricsLogger(tmp_path, process_index=0, resume_step=1) as logger:
    logger.log(2, {"loss": 0.75}, prefix="eval")
  scalars, purges = _scalars(tmp_path / "tb")
  assert purges == [2]
  assert (2, "eval/loss", 0.75) in scalars


def test_remote_workdir_writes_a_local_mirror_and_syncs(tmp_path, monkeypatch):
  """gs:// workdirs: files go to a local mirror and are copied to the workdir (here a local dir)."""
  remote = tmp_path / "bucket" / "run"
  remote.mkdir(parents=True)
  (remote / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 8.0}\n')
  monkeypatch.setattr(tlog, "_is_remote", lambda p: True)
  mirror = tmp_path / "mirror"
  logger = tlog.MetricsLogger(str(remote), process_index=0, resume_step=1, local_dir=mirror,
                              sync_interval_s=1e9)
  # The truncated history is written back at start.
  assert [r["train/loss"] for r in _lines(remote / "metrics.jsonl")] == [9.0]
  logger.log(2, {"loss": 7.0})
  # Not synced again before the interval: the remote does not have step 2 yet.
  assert [r["train/loss"] for r in _lines(remote / "metrics.jsonl")] == [9.0]
  assert [r["train/loss"] for r in _lines(mirror / "metrics.jsonl")] == [9.0, 7.0]
  logger.close()
  assert [(r["step"], r["train/loss"]) for r in _lines(remote / "metrics.jsonl")] == [(1, 9.0), (2, 7.0)]
  assert list((remote / "tb").glob("events.out.tfevents.*"))


# -- Weights & Biases --------------------------------------------------------------------------


def test_wandb_missing_gives_install_hint(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
  with pytest.raises(ImportError, match=r"pip install 'pro-jax\[wandb\]'"):
    tlog.MetricsLogger(tmp_path / "run", wandb_project="p", process_index=0)
  assert not (tmp_path / "run").exists()  # nothing written before the error


def test_wandb_receives_logs_and_resumes_same_run(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, data, step):
      calls.append(("log", dict(data), step))

    def finish(self):
      calls.append(("finish",))

  def init(**kw):
    calls.append(("init", kw))
    return Run()

  fake = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123"))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  with tlog.MetricsLogger(tmp_path, tensorboard=False, wandb_project="proj", config={"a": 1},
                          process_index=0) as logger:
    logger.log(3, {"loss": jnp.float32(1.25)})
  assert calls[0][0] == "init"
  assert calls[0][1]["project"] == "proj" and calls[0][1]["config"] == {"a": 1}
  assert calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"
  assert calls[1] == ("log", {"train/loss": 1.25}, 3)
  assert calls[2] == ("finish",)
  fake.util.generate_id = lambda: "other"
  with tlog.MetricsLogger(tmp_path, tensorboard=False, wandb_project="proj", process_index=0,
                          resume_step=3):
    pass
  assert calls[3][1]["id"] == "abc123"  # same run after a restart


# -- Progress bar ------------------------------------------------------------------------------


class FakeClock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


class FakeTTY(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_disabled_still_computes_rates():
  clock = FakeClock()
  bar = tlog.ProgressBar(100, disable=True, time_fn=clock, min_interval_s=1.0)
  assert bar.disabled
  clock.t += 0.5
  bar.update(1, loss=3.0, tokens=512)  # < min interval: rates not yet recomputed
  assert bar.steps_per_s is None
  clock.t += 1.5
  bar.update(5, loss=jnp.float32(2.0), tokens=1536)  # 5 steps, 2048 tokens in 2 s
  assert bar.steps_per_s == pytest.approx(2.5)
  assert bar.tokens_per_s == pytest.approx(1024.0)
  assert bar.loss == 2.0
  clock.t += 4.0
  bar.update(13, tokens=4096)  # 8 steps, 4096 tokens in 4 s
  assert bar.steps_per_s == pytest.approx(2.0)
  assert bar.tokens_per_s == pytest.approx(1024.0)
  # The trainer's pattern: a per-step update with tokens, then (same step, no time passed) the loss.
  clock.t += 1.0
  bar.update(14, tokens=1024)
  bar.update(14, loss=1.75)  # kept, shown at the next recomputation
  assert bar.loss == 2.0
  clock.t += 1.0
  bar.update(15, tokens=1024)
  assert bar.loss == 1.75 and bar.steps_per_s == pytest.approx(1.0)
  bar.close()


def test_progress_bar_auto_disable_and_fake_tty():
  assert tlog.ProgressBar(10, file=io.StringIO(), process_index=0).disabled  # not a TTY
  assert tlog.ProgressBar(10, file=FakeTTY(), process_index=1).disabled  # not process 0
  out, clock = FakeTTY(), FakeClock()
  bar = tlog.ProgressBar(10, desc="sft", initial=2, file=out, time_fn=clock, min_interval_s=0.0,
                         process_index=0)
  assert not bar.disabled
  clock.t += 2.0
  bar.update(6, loss=1.5, tokens=8000, extra={"kl": 0.125})
  assert bar.steps_per_s == pytest.approx(2.0)  # 4 steps since initial=2, in 2 s
  assert bar.tokens_per_s == pytest.approx(4000.0)
  assert bar.postfix({"kl": 0.125}) == "loss=1.5 step/s=2 tok/s=4k kl=0.125"
  bar.close()
  text = out.getvalue()
  assert "sft" in text and "6/10" in text and "loss=1.5" in text


# -- MFU ---------------------------------------------------------------------------------------


def test_peak_flops_table():
  assert train_flops.peak_flops("TPU v4") == 275e12
  assert train_flops.peak_flops("TPU v5 lite") == 197e12
  assert train_flops.peak_flops("TPU v5e") == 197e12
  assert train_flops.peak_flops("TPU v5") == 459e12
  assert train_flops.peak_flops("TPU v5p") == 459e12
  assert train_flops.peak_flops("TPU v6 lite") == 918e12
  assert train_flops.peak_flops("TPU v6e") == 918e12
  assert train_flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert train_flops.peak_flops("NVIDIA H200") == 989e12
  assert train_flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert train_flops.peak_flops("TPU v5 lite", jnp.bfloat16) == 197e12
  assert train_flops.peak_flops("cpu") is None
  assert train_flops.peak_flops("Some accelerator") is None
  assert train_flops.peak_flops("NVIDIA H100 80GB HBM3", "float32") is None
  assert train_flops.peak_flops("TPU v4", "int8") is None


def test_model_flops_against_hand_computation():
  cfg = ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=8)
  # Parameters in matmuls: q 4x4, k 4x2, v 4x2, o 4x4, gate/up/down 3 x 4x8, lm_head 4x10.
  n_matmul = 16 + 8 + 8 + 16 + 96 + 40
  assert n_matmul == 184
  layers, heads, head_dim, seq = 1, 2, 2, 16
  palm_train_per_token = 6 * n_matmul + 12 * layers * heads * head_dim * seq  # PaLM appendix B
  assert palm_train_per_token == 1872
  flops = train_flops.model_flops_per_step(cfg, tokens_per_step=32, seq_len=seq)
  assert flops == 32 * 1872
  fwd_only = train_flops.model_flops_per_step(cfg, tokens_per_step=32, seq_len=seq, backward=False)
  assert fwd_only == 32 * (2 * n_matmul + 4 * layers * heads * head_dim * seq) == 32 * 624
  with_ref = train_flops.model_flops_per_step(cfg, tokens_per_step=32, seq_len=seq, extra_forward_tokens=64)
  assert with_ref == 32 * 1872 + 64 * 624
  # MFU: 59904 FLOPs in 1 ms on 2 devices of 1e8 FLOP/s -> 59904e3 / 2e8.
  assert train_flops.mfu(flops, 1e-3, 2, 1e8) == pytest.approx(0.29952)
  assert train_flops.mfu(flops, 1e-3, 2, None) is None
  with pytest.raises(ValueError):
    train_flops.mfu(flops, 0.0, 2, 1e8)


def test_measure_cpu_matmul_peak_is_plausible():
  peak = train_flops.measure_cpu_matmul_peak(seconds=0.05, n=64)
  assert math.isfinite(peak) and 1e6 < peak < 1e14
