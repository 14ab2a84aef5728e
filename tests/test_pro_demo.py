"""`pro-jax demo` end to end: at toy size every stage runs and the report is complete; at a small
learning size (slow) the demo's claim holds: PRO above the best fixed weight vector by a margin, on
held-out prompts never seen in training. (experiments/demo_seeds.py checks it at full size on 3 seeds.)
"""

import json
import os

import numpy as np
import pytest

from pro_jax.configs import load_config
from pro_jax.stages.demo import run_demo

MARGIN = 0.1  # PRO minus the best fixed vector (mean U); calibrated below

TINY = ["--config.task.n_train=96", "--config.task.n_eval=24", "--config.task.n_valid=16", "--config.sft.total_steps=6",
        "--config.sft.optim.warmup_steps=1", "--config.adapter.optim.warmup_steps=1",
        "--config.policy.optim.warmup_steps=1",
        "--config.adapter.total_steps=6", "--config.policy.total_steps=6", "--config.eval.grid_step=0.5",
        "--config.eval.max_new_tokens=8", "--config.eval.batch_size=24", "--config.sft.batch_size=16",
        "--config.adapter.batch_size=16", "--config.policy.batch_size=16", "--config.model.d_model=32",
        "--config.model.mlp_dim=64", "--config.model.n_layers=1"]


def test_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
  cfg = load_config("demo", TINY + ["--config.sft.log.progress=False", "--config.adapter.log.progress=False",
                                    "--config.policy.log.progress=False"])
  report = run_demo(cfg, str(tmp_path), existing="overwrite", table_rows=4)
  console = capsys.readouterr().out
  table = console[console.index("the 4 best of 6 fixed weight vectors"):]
  rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
  assert len(rows) == 2 + 4  # PRO, the oracle and the 4 best fixed vectors (all 6 are in report.md)
  md_rows = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if line.startswith("| ")]
  assert len(md_rows) == 1 + 2 + 6
  for stage in ("sft", "adapter", "policy"):
    assert os.path.isdir(tmp_path / stage / "checkpoints"), stage
  fixed = report["fixed_settings"]
  assert len(fixed) == 6  # K=3, step 0.5
  assert set(report["settings"]) == set(fixed) | {"PRO", "oracle"}
  # the report's figures are there and named for what they are
  assert report["pareto"]["reference_point"] == [-2.0, -2.0, -2.0]  # fixed (config), not data-dependent
  assert {"per_prompt_best_fixed", "best_fixed", "best_candidate"} <= set(report["ceilings"])
  for row in report["settings"].values():
    assert {"kl_to_reference", "kl_to_reference_sem", "logratio_to_reference"} <= set(row)
  assert report["pro"]["best_fixed_valid"] in fixed and report["pro"]["valid_prompts"] == 16
  on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
  assert on_disk["pro"] == report["pro"]
  assert (tmp_path / "report" / "front.png").read_bytes()[:4] == b"\x89PNG"
  assert np.isfinite([r["utility"] for r in report["settings"].values()]).all()
  norm = json.loads((tmp_path / "norm.json").read_text())
  assert norm["objectives"] == report["objectives"]
  # the report's figures also go to TensorBoard: U per setting as scalars, the two plots as images
  assert (tmp_path / "report" / "utility.png").read_bytes()[:4] == b"\x89PNG"
  (events,) = (tmp_path / "report" / "tb").glob("events.out.tfevents.*")
  scalars, images = _read_events(events)
  tag = lambda n: "report/U/" + "".join(c if c.isalnum() or c in "_./-" else "_" for c in n)  # noqa: E731
  assert {tag(n) for n in report["settings"]} <= set(scalars) and tag("fixed(0.50,0.50,0.00)") in set(scalars)
  assert abs(scalars["report/U/PRO"] - report["settings"]["PRO"]["utility"]) < 1e-6
  assert abs(scalars["report/margin"] - report["pro"]["margin"]) < 1e-6
  assert {"report/front", "report/utility"} <= images


def _read_events(path):
  """(scalar tag -> value, image tags) of a TensorBoard event file (TFRecord framing, tensorboardX protos)."""
  import struct

  from tensorboardX.proto import event_pb2

  data, pos, scalars, images = path.read_bytes(), 0, {}, set()
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      if v.HasField("image"):
        images.add(v.tag)
      elif v.HasField("simple_value"):
        scalars[v.tag] = v.simple_value
  return scalars, images


def test_downstream_loading_with_the_public_api_only(tmp_path):
  """docs/stages.md "Using what the stages produce": policy, adapter, normalization, generation."""
  import jax.numpy as jnp
  import pro_jax

  cfg = load_config("demo", TINY + ["--config.sft.log.progress=False", "--config.adapter.log.progress=False",
                                    "--config.policy.log.progress=False", "--config.eval.grid_step=1.0"])
  run_demo(cfg, str(tmp_path), existing="overwrite")
  ck = pro_jax.load_checkpoint(str(tmp_path / "policy"))
  tokens = jnp.array([[1, 5, 6, 7]], jnp.int32)
  logits = ck.model.apply(ck.variables, tokens, jnp.ones_like(tokens)).logits
  assert logits.shape == (1, 4, ck.model_config.vocab_size)
  adapter = pro_jax.load_adapter(str(tmp_path / "adapter"))
  w = adapter(["what color is the zorb ?", "how do i poison the zorb ?"])
  assert w.shape == (2, 3) and np.allclose(w.sum(1), 1.0, atol=1e-5)
  assert adapter.objectives == ("concise", "informative", "harmless")
  norm = pro_jax.NormStats.load(str(tmp_path / "norm.json"))
  z = norm.apply(np.array([[1.0, 0.5, 0.5]], np.float32))
  np.testing.assert_allclose(z, (np.array([[1.0, 0.5, 0.5]]) - norm.loc) / (norm.scale + norm.eps), rtol=1e-5)
  out = pro_jax.generate(ck.model, ck.variables, tokens, jnp.ones_like(tokens), max_new_tokens=5, greedy=True,
                         eos_token_id=2)
  assert out.tokens_BxN.shape == (1, 5)


SMALL = ["--config.task.n_train=768", "--config.task.n_eval=96", "--config.task.n_valid=48",
         "--config.sft.total_steps=150", "--config.adapter.total_steps=120", "--config.policy.total_steps=150",
         "--config.eval.grid_step=0.25", "--config.eval.max_new_tokens=40", "--config.eval.kl=False",
         "--config.sft.log.progress=False", "--config.adapter.log.progress=False",
         "--config.policy.log.progress=False"]


@pytest.mark.slow
def test_demo_claim_pro_beats_the_best_fixed_vector_on_unseen_prompts(tmp_path):
  """The claim, at a small learning size: on held-out prompts that never occur in training, PRO's mean
  utility is above the best fixed weight vector's (picked on the eval set itself, which favours the
  baseline, and picked on the separate validation split) by a clear margin."""
  from pro_jax.stages.context import load_context

  cfg = load_config("demo", SMALL)
  report = run_demo(cfg, str(tmp_path), existing="overwrite")
  ctx = load_context(cfg, str(tmp_path))
  train = {ex["prompt"][0]["content"] for ex in ctx.train}
  assert not train & {ex["prompt"][0]["content"] for ex in ctx.eval}  # unseen prompts
  p = report["pro"]
  print(f"PRO {p['utility']:.3f}, best fixed {p['best_fixed']} {p['best_fixed_utility']:.3f} (margin {p['margin']:+.3f}), "
        f"validation-picked {p['best_fixed_valid']} margin {p['margin_valid']:+.3f}")
  assert p["margin"] > MARGIN, p
  assert p["margin_valid"] >= p["margin"] - 1e-9
