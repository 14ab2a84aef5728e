"""The real-model experiment (experiments/hh_smollm2.py: SmolLM2-135M-Instruct from its GGUF file on
the HH-RLHF test files), its quick preset end to end, and its statistics on hand-computed examples.
The figures of the full run are in docs/results.md; here only invariants are asserted."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _experiment():
  spec = importlib.util.spec_from_file_location("hh_smollm2", REPO / "experiments" / "hh_smollm2.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(mod)
  return mod


def test_paired_bootstrap_hand_example():
  hh = _experiment()
  # PRO exactly 0.1 above the only fixed vector on every prompt: every resample gives 0.1
  u_fix = np.array([0.3, -1.2, 0.7, 2.0])
  b = hh.paired_bootstrap(u_fix + 0.1, u_fix, n_boot=200, seed=0)
  np.testing.assert_allclose([b["delta"], b["lo"], b["hi"]], [0.1, 0.1, 0.1], atol=1e-12)
  assert b["p_le_0"] == 0.0
  # two prompts, two fixed vectors each good on one prompt, PRO good on both: delta = 1 - 0.5;
  # resamples (a,a) and (b,b) give 1 - 1 = 0, mixed ones 1 - 0.5 = 0.5 (probability 1/2 each)
  b = hh.paired_bootstrap(np.array([1.0, 1.0]), np.array([[0.0, 1.0], [1.0, 0.0]]), n_boot=4000, seed=1)
  assert b["delta"] == pytest.approx(0.5)
  assert b["lo"] == pytest.approx(0.0) and b["hi"] == pytest.approx(0.5)
  assert 0.45 < b["p_le_0"] < 0.55
  with pytest.raises(ValueError):
    hh.paired_bootstrap(np.zeros(3), np.zeros((4, 2)))


def test_auc_and_best_of_n_hand_examples():
  hh = _experiment()
  assert hh.auc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(3.5 / 4)
  assert hh.auc(np.array([5.0]), np.array([1.0, 2.0])) == 1.0
  z = np.array([[[1.0, -1.0], [-1.0, 1.0], [0.2, 0.2]]])  # one prompt, 3 candidates, K = 2
  assert hh.best_of_n(z, np.array([[1.0, 0.0]]))[0] == 0
  assert hh.best_of_n(z, np.array([[0.0, 1.0]]))[0] == 1
  assert hh.best_of_n(z, np.array([[0.5, 0.5]]))[0] == 2


def test_split_by_group_is_disjoint():
  hh = _experiment()
  turn = lambda t: [{"role": "user", "content": t}]
  rows = [{"prompt": turn(f"q{i % 7}") + [{"role": "assistant", "content": "a"}, {"role": "user", "content": str(i)}]}
          for i in range(40)]
  rows += [{"prompt": turn(f"Q{i % 7} ")} for i in range(10)]  # same groups (case / spaces normalized)
  train, held = hh.split_by_group(rows, 0.3, seed=0)
  assert len(train) + len(held) == len(rows) and train and held
  assert hh.overlap(train, held) == {"prompts": 0, "groups": 0}
  assert len({hh.group_key(r["prompt"]) for r in held}) == 2  # round(7 * 0.3) groups held out, whole


@pytest.mark.slow
def test_hh_smollm2_quick_end_to_end(shared_data, tmp_path, capsys):
  hh = _experiment()
  cfg = hh.SmolConfig(**hh.PRESETS["quick"])
  report = hh.run(str(tmp_path / "run"), str(shared_data), cfg)
  (r,) = report["seeds"]
  with capsys.disabled():
    print("\nSmolLM2 quick experiment:", {k: v["values"] for k, v in report["targets"].items()},
          "timings", report["timings_s"])
  # the split: whole first-turn groups on one side, in each file; the used subsets as configured
  for obj, s in report["split"].items():
    assert s["train"] + s["held_out"] == {"helpful": 2348, "harmless": 2308}[obj]
  used = report["rows_used"]
  assert used["held"] == 2 * cfg.held_pairs_per_file and used["gen"] == 2 * cfg.gen_prompts_per_file
  assert used["rm_a"] + used["rm_b"] == 2 * cfg.train_pairs_per_file
  # per-objective masks: every held-out pair counted for exactly its file's objective
  for k in ("rm", "eval_rm"):
    assert r["rm"][k]["held_out_pairs"] == {"helpful": cfg.held_pairs_per_file, "harmless": cfg.held_pairs_per_file}
  # the reward models fit their own training pairs (Bradley-Terry loss down); held-out accuracy on
  # this preset's 20 pairs per objective is noise-level (the full run's figures are in docs/results.md)
  for k in ("rm", "eval_rm"):
    assert np.mean(list(r["rm"][k]["train_accuracy"].values())) > 0.6, r["rm"]
    first, last = r["rm"][k]["loss_first_last"]
    assert last < first, r["rm"]
    assert all(0.0 <= v <= 1.0 for v in r["rm"][k]["held_out_accuracy"].values())
  # adapter weights on the simplex; targets too
  w = np.asarray(r["best_of_n"]["adapter_weights"])
  assert w.shape == (2 * cfg.gen_prompts_per_file, 2) and (w >= 0).all()
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
  for split in r["adapter"]["mean_weight_held_out"].values():
    np.testing.assert_allclose(sum(split), 1.0, rtol=1e-5)
  assert 0.0 <= r["adapter"]["split_auc"] <= 1.0
  # best-of-n: the grid (step 0.1: 11 vectors) and the baselines were all scored; the oracle bounds them
  u = r["best_of_n"]["utility"]
  assert sum(k.startswith("fixed[") for k in u) == 11
  assert all(u["oracle best-of-n (eval RM)"] >= v - 1e-9 for v in u.values())
  b = r["best_of_n"]["pro_minus_best_fixed"]
  best = max((k for k in u if k.startswith("fixed[")), key=u.get)
  assert b["delta"] == pytest.approx(u["PRO"] - u[best]) and b["lo"] <= b["hi"]
  # the policy trained and generated for PRO and each grid vector (step 1: the 2 corners)
  p = r["policy"]
  assert p["steps"] == cfg.policy_steps and set(p["utility"]) == {"PRO", "fixed[1.00,0.00]", "fixed[0.00,1.00]"}
  assert all(np.isfinite(v) for v in p["utility"].values())
  md = (tmp_path / "run" / "report.md").read_text()
  assert "PRO at inference" in md and (tmp_path / "run" / "utility_best_of_n.png").exists()
  assert json.loads((tmp_path / "run" / "report.json").read_text())["targets"].keys() == report["targets"].keys()
