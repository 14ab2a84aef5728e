"""Evaluation: settings -> generations -> scores -> U, win rates, front, report files.

The policy is a tiny random model (its text is arbitrary); the scorer is a hand-written function of
the response text, so every number in the report can be recomputed here independently.
"""

import json

import numpy as np
import pytest

import jax

from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.stages import evaluate
from pro_jax.pro.normalize import fit_norm_stats


class LengthScorer:
  """Objectives: 'short' = -words, 'long' = words, 'vowels' = share of vowels (hand-checkable)."""

  objectives = ("short", "long", "vowels")

  def score(self, prompts, responses):
    out = []
    for r in responses:
      n = len(r.split())
      letters = [c for c in r if c.isalpha()]
      out.append([-n, n, sum(c in "aeiou" for c in letters) / max(len(letters), 1)])
    return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from pro_jax.data import synthetic
  from transformers import AutoTokenizer
  d = tmp_path_factory.mktemp("tok")
  tok = AutoTokenizer.from_pretrained(str(synthetic.build_tokenizer(None, d)))
  cfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=4, mlp_dim=64, max_seq_len=64,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  model = Transformer(cfg)
  variables = init_variables(model, jax.random.PRNGKey(0))
  prompts = [f"what color is the {e} ?" for e in ("zorb", "kelpie", "fendle", "yarrow", "moxie")]
  return tok, model, variables, prompts


def test_evaluate_settings_numbers_and_report(setup, tmp_path):
  tok, model, variables, prompts = setup
  N, K = len(prompts), 3
  scorer = LengthScorer()
  norm = fit_norm_stats(np.array([[-1, 1, 0.2], [-5, 5, 0.5], [-9, 9, 0.3]], np.float32), scorer.objectives)
  uw = np.random.default_rng(0).dirichlet(np.ones(K), size=N).astype(np.float32)
  settings = {"PRO": uw[::-1].copy(), "fixed(a)": np.tile([1.0, 0, 0], (N, 1)), "fixed(b)": np.tile([0, 0.5, 0.5], (N, 1))}
  gen = evaluate.GenerationConfig(max_prompt_len=16, max_new_tokens=6, batch_size=4, greedy=True)
  policy = evaluate.Policy("p", model, variables, conditioned=False)  # same prompts as the reference: KL = 0
  report = evaluate.evaluate_settings(policy, settings, prompts, tok, scorer, norm, uw, gen=gen,
                                      reference=(model, variables))
  assert report["fixed_settings"] == ["fixed(a)", "fixed(b)"]
  for name, w in settings.items():
    # recompute independently: greedy text, hand scores, z-scores, U
    texts, _, _ = evaluate.generate_texts(model, variables, tok, prompts, gen)
    raw = scorer.score(prompts, texts)
    z = (raw - norm.loc) / (norm.scale + norm.eps)
    U = (uw * z).sum(1)
    row = report["settings"][name]
    assert row["utility"] == pytest.approx(U.mean(), rel=1e-5, abs=1e-6)
    for k, o in enumerate(scorer.objectives):
      assert row["raw"][o] == pytest.approx(raw[:, k].mean(), rel=1e-5, abs=1e-6)
    assert row["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)  # policy == reference, same tokens
    if name != "PRO":
      assert 0.0 <= row["pro_win_rate"] <= 1.0
  best = max(("fixed(a)", "fixed(b)"), key=lambda n: report["settings"][n]["utility"])
  assert report["pro"]["best_fixed"] == best
  assert report["pro"]["margin"] == pytest.approx(report["settings"]["PRO"]["utility"] -
                                                  report["settings"][best]["utility"])
  paths = evaluate.write_report(report, tmp_path / "report", title="t")
  assert json.loads(open(paths["json"]).read())["pro"]["best_fixed"] == best
  md = open(paths["md"]).read()
  assert "| PRO | per prompt |" in md and "fixed(a)" in md
  assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_weights_of_the_wrong_shape_are_rejected(setup):
  tok, model, variables, prompts = setup
  scorer = LengthScorer()
  norm = fit_norm_stats(np.array([[-1, 1, 0.2], [-5, 5, 0.5]], np.float32), scorer.objectives)
  with pytest.raises(ValueError, match="setting 'x'"):
    evaluate.evaluate_settings(evaluate.Policy("p", model, variables), {"x": np.ones((2, 3))}, prompts, tok, scorer,
                               norm, np.full((len(prompts), 3), 1 / 3))


def test_front_plot_shows_u_per_setting_best_first():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  settings = {"PRO": {"utility": 0.9, "utility_sem": 0.01}, "oracle": {"utility": 0.95, "utility_sem": 0.02},
              "fixed(a)": {"utility": 0.4, "utility_sem": 0.03}, "fixed(b)": {"utility": 0.5, "utility_sem": 0.01}}
  fig, ax = plt.subplots()
  evaluate._plot_utility(ax, {"settings": settings})
  heights = [p.get_height() for p in ax.patches]
  assert heights == pytest.approx([0.95, 0.9, 0.5, 0.4])
  colors = [matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches]
  assert colors[:2] == [matplotlib.colors.to_hex("tab:green"), matplotlib.colors.to_hex("tab:red")]
  labels = [t.get_text() for t in ax.get_xticklabels()]
  assert labels == ["oracle", "PRO", "best fixed\nfixed(b)"]
  plt.close(fig)


def _dominates(a, b):
  return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def _union_volume(points, ref):
  """Volume of the union of the boxes [ref, p] by inclusion-exclusion (exact, for a few points)."""
  import itertools
  total = 0.0
  for r in range(1, len(points) + 1):
    for sub in itertools.combinations(points, r):
      corner = np.min(np.asarray(sub), axis=0)
      total += (-1) ** (r + 1) * float(np.prod(np.maximum(corner - ref, 0.0)))
  return total


def test_conditioned_policy_weight_routing_pareto_and_hypervolume(setup):
  """A weight-conditioned policy (soft weight tokens: its output depends on the weights it is given):
  each prompt gets its own row's weights, the fixed settings' front and hypervolume (fixed reference
  point) match an independent computation, and the sampled KL to a different reference is positive."""
  tok, _, _, prompts = setup
  from pro_jax.stages.context import soft_placeholder
  placeholder, tid = soft_placeholder(tok)
  cfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=4, mlp_dim=64, max_seq_len=96,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, weight_tokens=2, num_weights=3,
                    weight_token_id=tid)
  model = Transformer(cfg)
  # large weights (x8, soft-token embeddings x160): a random model whose greedy text depends on its input
  variables = jax.tree_util.tree_map(lambda x: x * 8.0, init_variables(model, jax.random.PRNGKey(1)))
  variables["params"]["weight_embed"] = variables["params"]["weight_embed"] * 20.0
  policy = evaluate.Policy("cond", model, variables, conditioned=True, soft_placeholder=placeholder, soft_tokens=2)
  N, K = len(prompts), 3
  scorer = LengthScorer()
  norm = fit_norm_stats(np.array([[-1, 1, 0.2], [-5, 5, 0.5], [-9, 9, 0.3]], np.float32), scorer.objectives)
  uw = np.full((N, K), 1 / 3, np.float32)
  corners = np.eye(3, dtype=np.float32)
  pro_w = corners[[0, 1, 2, 0, 1]]  # each prompt its own corner
  settings = {"PRO": pro_w, **{f"fixed({i})": np.tile(corners[i], (N, 1)) for i in range(3)},
              "fixed(u)": np.full((N, K), 1 / 3, np.float32)}
  gen = evaluate.GenerationConfig(max_prompt_len=24, max_new_tokens=6, batch_size=8, greedy=True)
  other_ref = init_variables(Transformer(cfg.replace(weight_tokens=0)), jax.random.PRNGKey(7))
  report = evaluate.evaluate_settings(policy, settings, prompts, tok, scorer, norm, uw, gen=gen, hv_reference=-3.0,
                                      reference=(Transformer(cfg.replace(weight_tokens=0)), other_ref), kl_samples=2)
  def texts_for(w_NxK):  # independent generation, one setting at a time
    cond = [policy.condition(p, w, scorer.objectives) for p, w in zip(prompts, w_NxK)]
    return evaluate.generate_texts(model, variables, tok, cond, gen, np.asarray(w_NxK, np.float32))[0]

  def utility(texts):
    z = (scorer.score(prompts, texts) - norm.loc) / (norm.scale + norm.eps)
    return (uw * z).sum(1)

  # the policy's output depends on its weights
  outs = {i: texts_for(np.tile(corners[i], (N, 1))) for i in range(3)}
  assert len({tuple(v) for v in outs.values()}) > 1
  # routing: PRO's prompt n was answered under ITS row's weights (corner pro_w[n])
  pro_texts = [outs[int(np.argmax(pro_w[n]))][n] for n in range(N)]
  assert report["settings"]["PRO"]["utility"] == pytest.approx(float(utility(pro_texts).mean()), rel=1e-5, abs=1e-6)
  # Pareto front and hypervolume of the fixed settings, recomputed by hand with the fixed reference
  fixed = report["fixed_settings"]
  pts = {n: [report["settings"][n]["normalized"][o] for o in scorer.objectives] for n in fixed}
  front = [n for n in fixed if not any(_dominates(pts[m], pts[n]) for m in fixed)]
  assert report["pareto"]["front"] == front
  assert report["pareto"]["reference_point"] == [-3.0] * 3
  want = _union_volume([pts[n] for n in front], np.full(3, -3.0))
  assert report["pareto"]["hypervolume_fixed"] == pytest.approx(want, rel=1e-6)
  # ceilings: E_x max_w U over the fixed settings' own responses
  u_fixed = np.stack([utility(texts_for(settings[n])) for n in fixed], axis=1)
  assert report["ceilings"]["per_prompt_best_fixed"] == pytest.approx(float(u_fixed.max(1).mean()), rel=1e-5, abs=1e-6)
  assert report["ceilings"]["best_fixed"] == pytest.approx(float(u_fixed.mean(0).max()), rel=1e-5, abs=1e-6)
  # KL(pi || pi_ref) from temperature-1 samples, with a different reference: clearly positive
  for n in settings:
    row = report["settings"][n]
    assert row["kl_to_reference"] > 3 * row["kl_to_reference_sem"] > 0
    assert "logratio_to_reference" in row


def test_best_fixed_picked_on_validation():
  report = {"fixed_settings": ["a", "b"], "settings": {"PRO": {"utility": 0.5}, "a": {"utility": 0.4},
                                                       "b": {"utility": 0.1}},
            "pro": {"utility": 0.5, "best_fixed": "a"}}
  valid = {"num_prompts": 7, "settings": {"a": {"utility": 0.0}, "b": {"utility": 0.3}}}
  evaluate.add_validation_choice(report, valid)
  assert report["pro"]["best_fixed"] == "a"  # the eval-picked one stays
  assert report["pro"]["best_fixed_valid"] == "b"
  assert report["pro"]["best_fixed_valid_utility"] == 0.1
  assert report["pro"]["margin_valid"] == pytest.approx(0.4)
