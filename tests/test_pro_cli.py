"""The PRO stages through the `pro-jax` command line, on the embedded task at toy size.

sft -> rm (a learned multi-head RM is the scorer here) -> adapter -> two DPO-type policies (one with the
adapter's per-prompt weights, one with fixed weights) -> eval comparing them. Checks the wiring, the
files each stage leaves, exit codes and the report's structure (the sizes are far too small to learn).
"""

import json

import pytest

from pro_jax.cli import EXIT_OK, EXIT_USAGE, main

TINY = ["--config.task.n_train=64", "--config.task.n_eval=16", "--config.model.d_model=32",
        "--config.model.mlp_dim=64", "--config.model.n_layers=1", "--config.scorers=rm",
        "--config.eval.max_new_tokens=6", "--config.eval.batch_size=16", "--config.policy.pro.loss=wdpo"]
for _stage in ("sft", "rm", "adapter", "policy"):
  TINY += [f"--config.{_stage}.total_steps=3", f"--config.{_stage}.batch_size=8",
           f"--config.{_stage}.optim.warmup_steps=1", f"--config.{_stage}.log.progress=False",
           f"--config.{_stage}.log.tensorboard=False"]


def run(command, *args):
  return main([command] + TINY + list(args))  # the test's own overrides come last and win


def test_stages_from_the_command_line(tmp_path, capsys):
  w = str(tmp_path / "w")
  assert run("sft", "--config", "demo", "--workdir", w) == EXIT_OK
  assert run("rm", "--config", "demo", "--workdir", w) == EXIT_OK
  held = json.loads((tmp_path / "w" / "rm" / "heldout.json").read_text())
  assert set(held["accuracy"]) == {"concise", "informative", "harmless"}
  assert run("adapter", "--config", "demo", "--workdir", w) == EXIT_OK
  assert (tmp_path / "w" / "norm.json").exists() and (tmp_path / "w" / "scores.sqlite").exists()
  assert run("policy", "--config", "demo", "--workdir", w, "--config.policy.pro.name=pro") == EXIT_OK
  assert run("policy", "--config", "demo", "--workdir", w, "--config.policy.pro.name=fixed",
             "--config.policy.pro.weights_source=fixed:[0.6,0.2,0.2]") == EXIT_OK
  capsys.readouterr()
  assert run("eval", "--config", "demo", "--workdir", w, "--config.eval.policies=pro,fixed") == EXIT_OK
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  report = json.loads((tmp_path / "w" / "report" / "report.json").read_text())
  assert set(report["settings"]) == {"PRO", "fixed(0.60,0.20,0.20)"}
  assert report["settings"]["PRO"]["policy"] == "pro"
  assert report["pro"]["best_fixed"] == "fixed(0.60,0.20,0.20)" == out["best_fixed"]
  assert out["margin"] == pytest.approx(report["settings"]["PRO"]["utility"] -
                                        report["settings"]["fixed(0.60,0.20,0.20)"]["utility"])
  # bad input is reported before anything runs: an unknown loss, a typo in a key
  assert run("policy", "--config", "demo", "--workdir", w, "--config.policy.pro.loss=dpo2",
             "--config.policy.pro.name=bad") == EXIT_USAGE
  assert not (tmp_path / "w" / "bad").exists()
  assert run("eval", "--config", "demo", "--workdir", w, "--config.eval.grid_stepp=0.1") == EXIT_USAGE


def test_weight_conditioned_policy_with_soft_tokens(tmp_path):
  """policy.pro.loss=ric with conditioning_mode=soft: weights enter as learned token embeddings."""
  w = str(tmp_path / "w")
  soft = ["--config.scorers=synthetic", "--config.policy.pro.loss=ric", "--config.policy.pro.conditioning_mode=soft",
          "--config.policy.pro.soft_tokens=2", "--config.eval.grid_step=0.5"]
  for stage in ("sft", "adapter", "policy", "eval"):
    assert run(stage, "--config", "demo", "--workdir", w, *soft) == EXIT_OK, stage
  import pro_jax
  ck = pro_jax.load_checkpoint(str(tmp_path / "w" / "policy"))
  assert ck.model_config.weight_tokens == 2 and ck.model_config.num_weights == 3
  assert ck.params["weight_embed"].shape == (3, 2, ck.model_config.d_model)
  assert ck.extra["conditioning"] == "soft" and ck.extra["soft_placeholder"] == "<unk>"
  report = json.loads((tmp_path / "w" / "report" / "report.json").read_text())
  assert len(report["fixed_settings"]) == 6 and "PRO" in report["settings"]
  assert report["settings"]["PRO"]["samples"][0]["prompt"].endswith("<unk> <unk>")
