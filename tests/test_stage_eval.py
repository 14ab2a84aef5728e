"""Evaluation during training: a stage's held-out split scored by the engine every
`log.eval_every_steps` steps, under eval/ in metrics.jsonl / TensorBoard, and as a progress line."""

import json
import math

from pro_jax.configs import load_config
from pro_jax.stages.pipeline import run_stage
from pro_jax.train.logging import read_metrics

TINY = ["--config.task.n_train=48", "--config.task.n_eval=16", "--config.model.d_model=32", "--config.model.mlp_dim=64",
        "--config.model.n_layers=1", "--config.rm.pro.source=scratch", "--config.rm.total_steps=4",
        "--config.rm.batch_size=16", "--config.rm.optim.warmup_steps=1", "--config.rm.log.every_steps=2",
        "--config.rm.log.eval_every_steps=2", "--config.rm.log.tensorboard=false"]


def test_reward_model_held_out_accuracy_logged_during_training(tmp_path, capsys):
  cfg = load_config("demo", TINY)
  held = run_stage("rm", cfg, str(tmp_path))  # the stage's own held-out pair accuracy (pair_accuracy)
  records = read_metrics(tmp_path / "rm")
  evals = {r["step"]: r for r in records if "eval/loss" in r}
  assert sorted(evals) == [2, 4]
  final = evals[4]
  assert math.isfinite(final["eval/loss"]) and final["eval/examples"] > 0
  # the engine's eval/ figures on the final params are the pair accuracies pair_accuracy computes
  # independently on the merged model (the 16 held-out prompts fit one batch)
  compared = 0
  for name, acc in held["accuracy"].items():
    if held["count"][name]:
      assert abs(final[f"eval/accuracy/{name}"] - acc) < 1e-6, (name, final, held)
      assert final[f"eval/labels/{name}"] == held["count"][name]
      compared += 1
  assert compared >= 2
  assert all("train/loss" in r for r in records if r["step"] in (2, 4) and "eval/loss" not in r)
  err = capsys.readouterr().err
  assert "[reward_model] eval at step 4: " in err and "accuracy" in err
  assert json.loads((tmp_path / "rm" / "heldout.json").read_text())["accuracy"] == held["accuracy"]
