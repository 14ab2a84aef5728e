"""Evaluation: settings -> generations -> scores -> U, win rates, front, report files.

The policy is a tiny random model (its text is arbitrary); the scorer is a hand-written function of
the response text, so every number in the report can be recomputed here independently.
"""

import json

import numpy as np
import pytest

import jax

from pro_jax.models import ModelConfig, Transformer, init_variables
from pro_jax.stages import evaluate as E
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
  import pro_jax.data.synthetic as S
  from transformers import AutoTokenizer
  d = tmp_path_factory.mktemp("tok")
  tok = AutoTokenizer.from_pretrained(str(S.build_tokenizer(None, d)))
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
  gen = E.GenerationConfig(max_prompt_len=16, max_new_tokens=6, batch_size=4, greedy=True)
  policy = E.Policy("p", model, variables, conditioned=False)  # same prompts as the reference: KL = 0
  report = E.evaluate_settings(policy, settings, prompts, tok, scorer, norm, uw, gen=gen,
                               reference=(model, variables))
  assert report["fixed_settings"] == ["fixed(a)", "fixed(b)"]
  for name, w in settings.items():
    # recompute independently: greedy text, hand scores, z-scores, U
    texts, _, _ = E.generate_texts(model, variables, tok, prompts, gen)
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
  paths = E.write_report(report, tmp_path / "report", title="t")
  assert json.loads(open(paths["json"]).read())["pro"]["best_fixed"] == best
  md = open(paths["md"]).read()
  assert "| PRO | per prompt |" in md and "fixed(a)" in md
  assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_weights_of_the_wrong_shape_are_rejected(setup):
  tok, model, variables, prompts = setup
  scorer = LengthScorer()
  norm = fit_norm_stats(np.array([[-1, 1, 0.2], [-5, 5, 0.5]], np.float32), scorer.objectives)
  with pytest.raises(ValueError, match="setting 'x'"):
    E.evaluate_settings(E.Policy("p", model, variables), {"x": np.ones((2, 3))}, prompts, tok, scorer, norm,
                        np.full((len(prompts), 3), 1 / 3))
