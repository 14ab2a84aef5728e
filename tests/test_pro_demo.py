"""`pro-jax demo` end to end at toy size: every stage runs, the report is complete and consistent.

(The demo's claim, PRO above the best fixed weight vector, is checked at full size by
experiments/demo_seeds.py on 3 seeds; here the sizes are too small for the policy to learn.)
"""

import json
import os

import numpy as np

from pro_jax.configs import load_config
from pro_jax.stages.demo import run_demo

TINY = ["--config.task.n_train=96", "--config.task.n_eval=24", "--config.sft.total_steps=6",
        "--config.sft.optim.warmup_steps=1", "--config.adapter.optim.warmup_steps=1",
        "--config.policy.optim.warmup_steps=1",
        "--config.adapter.total_steps=6", "--config.policy.total_steps=6", "--config.eval.grid_step=0.5",
        "--config.eval.max_new_tokens=8", "--config.eval.batch_size=24", "--config.sft.batch_size=16",
        "--config.adapter.batch_size=16", "--config.policy.batch_size=16", "--config.model.d_model=32",
        "--config.model.mlp_dim=64", "--config.model.n_layers=1"]


def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
  cfg = load_config("demo", TINY + ["--config.sft.log.progress=False", "--config.adapter.log.progress=False",
                                    "--config.policy.log.progress=False"])
  report = run_demo(cfg, str(tmp_path), existing="overwrite")
  for stage in ("sft", "adapter", "policy"):
    assert os.path.isdir(tmp_path / stage / "checkpoints"), stage
  fixed = report["fixed_settings"]
  assert len(fixed) == 6  # K=3, step 0.5
  assert set(report["settings"]) == set(fixed) | {"PRO", "oracle"}
  best = max(fixed, key=lambda n: report["settings"][n]["utility"])
  assert report["pro"]["best_fixed"] == best
  assert report["pro"]["margin"] == report["settings"]["PRO"]["utility"] - report["settings"][best]["utility"]
  th = report["theorem"]
  assert th["per_prompt_best"] >= th["best_fixed_candidates"]  # the theorem's inequality on the candidates
  on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
  assert on_disk["pro"] == report["pro"]
  assert (tmp_path / "report" / "front.png").read_bytes()[:4] == b"\x89PNG"
  assert np.isfinite([r["utility"] for r in report["settings"].values()]).all()
  norm = json.loads((tmp_path / "norm.json").read_text())
  assert norm["objectives"] == report["objectives"]


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
