"""The embedded synthetic task: determinism, schema, reward formulas, pairs, theorem, tokenizer."""

import dataclasses

import numpy as np
import pytest

from pro_jax.data import synthetic
from pro_jax.pro.weights import simplex_grid
from pro_jax.data.schema import FIELDS
from pro_jax.data.validate import validate_example

SMALL = synthetic.SyntheticTaskConfig(seed=0, n_train=600, n_eval=200, label_noise=0.0)


@pytest.fixture(scope="module")
def task():
  return synthetic.generate_task(SMALL)


@pytest.fixture(scope="module")
def kb():
  return synthetic.make_knowledge_base(SMALL)


def _z_utility(scores, weights, mean, std):
  # independent re-statement of U = sum_k w_k (r_k - mu_k) / sd_k
  out = 0.0
  for k in range(len(weights)):
    out += weights[k] * (scores[k] - mean[k]) / std[k]
  return out


# ---------------------------------------------------------------------------------------------
# determinism, sizes, schema


def test_same_seed_same_task_different_seed_different(task):
  again = synthetic.generate_task(SMALL)
  assert again == task
  other = synthetic.generate_task(synthetic.SyntheticTaskConfig(seed=1, n_train=600, n_eval=200, label_noise=0.0))
  assert [e["prompt"] for e in other["train"]] != [e["prompt"] for e in task["train"]]
  other = synthetic.make_knowledge_base(synthetic.SyntheticTaskConfig(seed=1))
  assert other.facts != synthetic.make_knowledge_base(SMALL).facts


def test_sizes_and_schema(task):
  assert len(task["train"]) == 600 and len(task["eval"]) == 200
  ids = set()
  for split in ("train", "eval"):
    for row, ex in enumerate(task[split]):
      validate_example(ex, file=split, row=row + 1)  # the shared schema's own checks
      for f in FIELDS:
        assert f in ex
      assert ex["source"] == "synthetic"
      assert ex["objectives"] == ["concise", "informative", "harmless"]
      assert [m["role"] for m in ex["prompt"]] == ["user"]
      assert len(ex["responses"]) == SMALL.n_candidates == len(set(ex["responses"]))
      assert np.asarray(ex["scores"]).shape == (SMALL.n_candidates, 3)
      assert np.all(np.asarray(ex["score_mask"]) == 1.0)
      assert ex["chosen"] in ex["responses"] and ex["rejected"] in ex["responses"]
      assert ex["chosen"] != ex["rejected"]
      assert len(ex["pair_objectives"]) == 3
      assert ex["prompt_type"] in ("factual", "explain", "risky")
      ids.add(ex["id"])
  assert len(ids) == 800
  types = [ex["prompt_type"] for ex in task["train"]]
  for t in ("factual", "explain", "risky"):  # uniform mixture
    assert 150 < types.count(t) < 250


def test_default_size_task():
  t = synthetic.generate_task(synthetic.SyntheticTaskConfig())  # what the demo uses; about 1.6 s on one core
  assert len(t["train"]) == 4096 and len(t["eval"]) == 512
  assert len({ex["id"] for ex in t["train"]}) == 4096
  assert all(len(ex["responses"]) == 6 for ex in t["eval"])


def test_sizes_configurable():
  cfg = synthetic.SyntheticTaskConfig(seed=3, n_train=7, n_eval=3, n_candidates=4, n_entities=5, humor=True)
  t = synthetic.generate_task(cfg)
  assert len(t["train"]) == 7 and len(t["eval"]) == 3
  assert all(len(ex["responses"]) == 4 for ex in t["train"])
  assert t["train"][0]["objectives"] == ["concise", "informative", "harmless", "humor"]
  assert len(synthetic.make_knowledge_base(cfg).entities) == 5


def test_stored_scores_are_the_reward_functions(task):
  rewards = synthetic.SyntheticRewards(SMALL)
  exs = task["eval"][:50]
  prompts = [ex["prompt"] for ex in exs for _ in ex["responses"]]
  responses = [r for ex in exs for r in ex["responses"]]
  got = rewards.score(prompts, responses)
  want = np.concatenate([np.asarray(ex["scores"], np.float32) for ex in exs])
  np.testing.assert_array_equal(got, want)
  for ex in exs:
    np.testing.assert_array_equal(ex["reward_chosen"], ex["scores"][ex["responses"].index(ex["chosen"])])


# ---------------------------------------------------------------------------------------------
# reward formulas against hand-computed values


def _scores(prompt, response, cfg=SMALL):
  return synthetic.SyntheticRewards(cfg).score([prompt], [response])[0]


def test_reward_direct_answer_and_wrong_answer(kb):
  e = kb.entities[0]
  color = kb.facts[e]["color"]
  wrong = next(c for c in synthetic.ATTRIBUTES["color"][0] if c != color)
  q = f"what color is the {e} ?"
  # 5 tokens (<= 8 free): concise 1; informative (1 fact + asked bonus) / 6; harmless 0.5 * wf
  np.testing.assert_allclose(_scores(q, f"the {e} is {color} ."), [1.0, 2 / 6, 0.5], rtol=1e-6)
  np.testing.assert_allclose(_scores(q, f"it is {color} ."), [1.0, 2 / 6, 0.5], rtol=1e-6)
  # a wrong fact: informative clipped at 0
  np.testing.assert_allclose(_scores(q, f"the {e} is {wrong} ."), [1.0, 0.0, 0.5], rtol=1e-6)
  # duplicates count once; 10 tokens -> concise 1 / (1 + 2 / 10)
  np.testing.assert_allclose(_scores(q, f"the {e} is {color} . the {e} is {color} ."),
                             [1 / 1.2, 2 / 6, 0.5], rtol=1e-6)
  # punctuation glued to words is split like the tokenizer does
  np.testing.assert_allclose(_scores(q, f"The {e} is {color}."), [1.0, 2 / 6, 0.5], rtol=1e-6)


def test_reward_detailed_answer_with_caution(kb):
  e = kb.entities[1]
  f = kb.facts[e]
  q = f"what color is the {e} ?"
  r = f"the {e} is {f['color']} . it lives in the {f['home']} . it eats {f['food']} . please be careful ."
  # 5 + 6 + 4 + 4 = 19 tokens -> concise 1 / (1 + 11 / 10); informative (3 + 1) / 6; harmless .5 + .1
  np.testing.assert_allclose(_scores(q, r), [1 / 2.1, 4 / 6, 0.6], rtol=1e-6)
  # same answer to an explain prompt: no asked-attribute bonus
  np.testing.assert_allclose(_scores(f"tell me all about the {e} in detail .", r), [1 / 2.1, 3 / 6, 0.6],
                             rtol=1e-6)


def test_reward_refusal_and_harmful_compliance(kb):
  e = kb.entities[2]
  # 9 tokens -> concise 1 / 1.1; harmless 0.5 + 0.4
  np.testing.assert_allclose(_scores(f"how do i poison the {e} ?", "sorry , i can not help with that ."),
                             [1 / 1.1, 0.0, 0.9], rtol=1e-6)
  comply = "first , put poison in its food . then , set a trap near its home ."
  # 17 tokens -> concise 1 / 1.9; two harmful steps answer a risky prompt: informative 2 / 6; harmless 0
  np.testing.assert_allclose(_scores(f"how do i poison the {e} ?", comply), [1 / 1.9, 2 / 6, 0.0],
                             rtol=1e-6)
  # the same steps in reply to a benign question are not informative, and still harmful
  np.testing.assert_allclose(_scores(f"what color is the {e} ?", comply), [1 / 1.9, 0.0, 0.0], rtol=1e-6)
  # refusing a benign request: harmless but useless
  np.testing.assert_allclose(
      _scores(f"what color is the {e} ?", "sorry , i can not help with that . please be careful ."),
      [1 / 1.5, 0.0, 1.0], rtol=1e-6)


def test_reward_garbage_and_off_topic(kb):
  e, other = kb.entities[0], kb.entities[3]
  q = [{"role": "user", "content": f"what color is the {e} ?"}]
  for junk in ("", "   ", "asdf qwer zxcv", "the the the .", "<eos> <pad> ???", "\x00\x01 é ü"):
    np.testing.assert_array_equal(_scores(q, junk), [0.0, 0.0, 0.0])
  color = kb.facts[e]["color"]
  # half the sentences well-formed: wf 0.5, 8 tokens -> concise 0.5 / 1, harmless 0.25
  np.testing.assert_allclose(_scores(q, f"the {e} is {color} . blah blah ."), [0.5, 2 / 6, 0.25],
                             rtol=1e-6)
  # a correct fact about another creature is not information about this one
  oc = kb.facts[other]["color"]
  np.testing.assert_allclose(_scores(q, f"the {other} is {oc} ."), [1.0, 0.0, 0.5], rtol=1e-6)
  # a prompt naming no known creature: no fact can be correct
  np.testing.assert_allclose(_scores("hello there", f"the {e} is {color} ."), [1.0, 0.0, 0.5], rtol=1e-6)


def test_reward_prompt_forms_agree(kb):
  e = kb.entities[0]
  r = f"the {e} is {kb.facts[e]['color']} ."
  text = f"what color is the {e} ?"
  forms = [text, [{"role": "user", "content": text}], f"\n\nHuman: {text}\n\nAssistant:",
           f"<bos><|user|> {text} <|assistant|>",
           [{"role": "system", "content": "be nice ."}, {"role": "user", "content": text}]]
  rewards = synthetic.SyntheticRewards(SMALL)
  got = rewards.score(forms, [r] * len(forms))
  np.testing.assert_allclose(got, np.tile([1.0, 2 / 6, 0.5], (len(forms), 1)), rtol=1e-6)
  with pytest.raises(ValueError):
    rewards.score([text], [r, r])


def test_reward_humor(kb):
  cfg = synthetic.SyntheticTaskConfig(seed=0, humor=True)
  e, other = kb.entities[0], kb.entities[1]
  q = f"tell me a joke about the {e} ."
  joke = f"the {e} walked into a bar and asked for fish !"
  # 11 tokens -> concise 1 / 1.3; harmless 0.5; humor 1 (about the prompt's creature)
  np.testing.assert_allclose(_scores(q, joke, cfg), [1 / 1.3, 0.0, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(_scores(q, joke.replace(e, other), cfg), [1 / 1.3, 0.0, 0.5, 0.5], rtol=1e-6)
  # a joke inside half-garbage: humor scaled by wf = 0.5
  np.testing.assert_allclose(_scores(q, joke + " zz", cfg)[3], 0.5, rtol=1e-6)
  assert synthetic.SyntheticRewards(cfg).objectives == ["concise", "informative", "harmless", "humor"]


def test_reward_throughput_shape():
  rewards = synthetic.SyntheticRewards(SMALL)
  out = rewards.score(["what color is the zorb ?"] * 3, ["a", "b .", "sorry , i can not help with that ."])
  assert out.shape == (3, 3) and out.dtype == np.float32


def test_parse_prompt():
  assert synthetic.parse_prompt("quick question : where does the zorb live ?") == {
      "type": "factual", "entity": "zorb", "asked": "home", "risky_verb": None}
  assert synthetic.parse_prompt("how do i trap the wug ?")["type"] == "risky"
  assert synthetic.parse_prompt("please describe the dax fully .")["type"] == "explain"
  # not a task template: keyword fallback
  assert synthetic.parse_prompt("could you steal my zorb")["type"] == "risky"
  assert synthetic.parse_prompt("so , what color is a zorb ?")["asked"] == "color"


# ---------------------------------------------------------------------------------------------
# pairs and hidden weights


def test_pairs_follow_hidden_weighting(task):
  mean, std = synthetic.reward_stats(task["train"])
  # the stats are the plain mean / std over every train candidate
  all_s = np.concatenate([np.asarray(ex["scores"]) for ex in task["train"]])
  np.testing.assert_allclose(mean, all_s.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, all_s.std(0), rtol=1e-5)
  for ex in task["train"] + task["eval"]:
    w = ex["true_weights"]
    u = [_z_utility(s, w, mean, std) for s in ex["scores"]]
    uc = _z_utility(ex["reward_chosen"], w, mean, std)
    ur = _z_utility(ex["reward_rejected"], w, mean, std)
    assert uc > ur
    assert uc == pytest.approx(max(u), abs=1e-6)  # best_vs_random: chosen is the best candidate
    rc, rr = np.asarray(ex["reward_chosen"]), np.asarray(ex["reward_rejected"])
    np.testing.assert_array_equal(ex["pair_objectives"], np.sign(rc - rr).astype(np.float32))


def test_pair_labels_oriented_by_each_objective(task):
  """A pair labels objective k by k's own ordering: -1 where the rejected response wins on k
  (not dropped), +1 where the chosen one does, 0 on a tie."""
  po = np.asarray([ex["pair_objectives"] for ex in task["train"]])
  rc = np.asarray([ex["reward_chosen"] for ex in task["train"]])
  rr = np.asarray([ex["reward_rejected"] for ex in task["train"]])
  for k in range(3):
    assert np.all(po[rc[:, k] > rr[:, k], k] == 1.0)
    assert np.all(po[rc[:, k] < rr[:, k], k] == -1.0)
    assert np.all(po[rc[:, k] == rr[:, k], k] == 0.0)
    assert (po[:, k] == -1.0).sum() > 30  # every objective has pairs the utility's winner loses
  np.testing.assert_array_equal(synthetic.pair_labels([1.0, 0.5, 0.2], [0.5, 0.5, 0.3]), [1.0, 0.0, -1.0])


def test_copied_total_utility_scores_worse_than_per_objective_scorer():
  """Per-objective pair accuracy must measure per-objective skill: a scorer that copies the total
  (hidden-weight) utility to every head is near chance on each objective's labels, while a scorer
  with per-objective skill (here the true per-objective rewards, the trained heads' stand-in) is
  right on every one. Before labels were oriented per objective, the copy scored 0.94-0.98."""
  t = synthetic.generate_task(synthetic.SyntheticTaskConfig(seed=0))  # default label noise
  stats = synthetic.reward_stats(t["train"])
  ev = t["eval"]
  po = np.asarray([ex["pair_objectives"] for ex in ev])
  rc = np.asarray([ex["reward_chosen"] for ex in ev])
  rr = np.asarray([ex["reward_rejected"] for ex in ev])
  w = np.asarray([ex["true_weights"] for ex in ev])
  uc = np.asarray([_z_utility(r, x, *stats) for r, x in zip(rc, w)])
  ur = np.asarray([_z_utility(r, x, *stats) for r, x in zip(rr, w)])
  for k in range(3):
    lab = po[:, k] != 0
    assert lab.sum() > 200
    per_objective = np.mean((rc[lab, k] > rr[lab, k]) == (po[lab, k] > 0))
    copied = np.mean((uc[lab] > ur[lab]) == (po[lab, k] > 0))
    assert per_objective == 1.0
    assert copied < 0.7 and per_objective - copied > 0.3, (k, copied)


def _template(ex) -> tuple[str, str]:
  """(creature, the prompt with its creature replaced by a placeholder)."""
  text = ex["prompt"][0]["content"]
  entity = next(w for w in text.split() if w in synthetic.ENTITY_POOL)
  return entity, " ".join("_" if w == entity else w for w in text.split())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eval_prompts_never_occur_in_training(seed):
  """Held-out means unseen: no eval prompt occurs verbatim in the training prompts (it was 94-95%),
  yet each eval prompt's creature and template occur in training (new combinations of seen parts)."""
  t = synthetic.generate_task(synthetic.SyntheticTaskConfig(seed=seed))  # the default sizes
  train = {ex["prompt"][0]["content"] for ex in t["train"]}
  evals = {ex["prompt"][0]["content"] for ex in t["eval"]}
  assert len(train & evals) == 0
  assert len(evals) > 60
  seen_e = {_template(ex)[0] for ex in t["train"]}
  seen_t = {_template(ex)[1] for ex in t["train"]}
  for ex in t["eval"]:
    e, tmpl = _template(ex)
    assert e in seen_e and tmpl in seen_t
  # every prompt type is held out
  assert {ex["prompt_type"] for ex in t["eval"]} == {"factual", "explain", "risky"}


def test_validation_split_disjoint_from_train_and_eval():
  cfg = synthetic.SyntheticTaskConfig(seed=0, n_train=800, n_eval=200, n_valid=150, humor=True)
  t = synthetic.generate_task(cfg)
  assert len(t["validation"]) == 150
  text = {sp: {ex["prompt"][0]["content"] for ex in t[sp]} for sp in ("train", "eval", "validation")}
  assert not text["train"] & text["eval"]
  assert not text["train"] & text["validation"]
  assert not text["eval"] & text["validation"]
  assert {ex["prompt_type"] for ex in t["validation"]} == set(cfg.prompt_types)
  for row, ex in enumerate(t["validation"]):
    validate_example(ex, file="validation", row=row + 1)
  # the combinations: shares as configured (1/20 steps), disjoint, covering every combination
  splits = synthetic.prompt_splits(cfg)
  for ptype in cfg.prompt_types:
    sets = {sp: set(splits[sp][ptype]) for sp in splits}
    n = sum(len(v) for v in sets.values())
    assert len(set().union(*sets.values())) == n
    if n >= 100:
      assert abs(len(sets["eval"]) / n - cfg.eval_fraction) < 0.05
      assert abs(len(sets["validation"]) / n - cfg.valid_fraction) < 0.05
  # n_valid changes neither the train nor the eval split (the validation combinations are always reserved)
  no_valid = synthetic.generate_task(dataclasses.replace(cfg, n_valid=0))
  assert "validation" not in no_valid
  assert no_valid["train"] == t["train"] and no_valid["eval"] == t["eval"]
  with pytest.raises(ValueError, match="eval_fraction"):
    synthetic.SyntheticTaskConfig(eval_fraction=0.0)


def test_chosen_kind_per_type(task):
  for ex in task["train"]:
    c = np.asarray(ex["reward_chosen"])
    if ex["prompt_type"] == "factual":  # one short correct answer to the question
      assert c[0] == 1.0 and c[1] == pytest.approx(2 / 6) and ex["chosen"].count(" .") == 1
    elif ex["prompt_type"] == "explain":
      assert c[1] >= 4 / 6 - 1e-6  # many correct facts
    else:
      assert c[2] >= 0.9 - 1e-6  # a refusal


def test_label_noise_rate():
  cfg = synthetic.SyntheticTaskConfig(seed=5, n_train=1500, n_eval=0, label_noise=0.3)
  t = synthetic.generate_task(cfg)
  mean, std = synthetic.reward_stats(t["train"])
  flipped, dominated = [], 0
  for ex in t["train"]:
    uc = _z_utility(ex["reward_chosen"], ex["true_weights"], mean, std)
    ur = _z_utility(ex["reward_rejected"], ex["true_weights"], mean, std)
    lo, hi = (ex["reward_chosen"], ex["reward_rejected"]) if uc < ur else (ex["reward_rejected"], ex["reward_chosen"])
    if all(a >= b for a, b in zip(hi, lo)):  # Pareto-ordered pairs are never swapped
      assert uc > ur
      dominated += 1
    else:
      flipped.append(uc < ur)
    assert any(ex["pair_objectives"])  # a valid pair always speaks for some objective
  assert dominated > 50
  assert 0.25 < np.mean(flipped) < 0.35


def test_random_pair_mode():
  cfg = synthetic.SyntheticTaskConfig(seed=2, n_train=300, n_eval=0, label_noise=0.0, pair_mode="random_pair")
  t = synthetic.generate_task(cfg)
  mean, std = synthetic.reward_stats(t["train"])
  not_best = 0
  for ex in t["train"]:
    uc = _z_utility(ex["reward_chosen"], ex["true_weights"], mean, std)
    assert uc > _z_utility(ex["reward_rejected"], ex["true_weights"], mean, std)
    not_best += uc < max(_z_utility(s, ex["true_weights"], mean, std) for s in ex["scores"]) - 1e-9
  assert not_best > 50


def test_true_weights(task):
  want = {"factual": [0.7, 0.2, 0.1], "explain": [0.15, 0.75, 0.1], "risky": [0.1, 0.2, 0.7]}
  for ex in task["train"]:
    np.testing.assert_allclose(ex["true_weights"], want[ex["prompt_type"]], rtol=1e-6)
    np.testing.assert_allclose(synthetic.true_weights(ex, SMALL), want[ex["prompt_type"]], rtol=1e-6)
    assert ex["prompt_type_id"] == ["factual", "explain", "risky"].index(ex["prompt_type"])
  custom = synthetic.SyntheticTaskConfig(n_train=30, n_eval=0, type_weights={
      "factual": (1.0, 0.0, 0.0), "explain": (0.0, 1.0, 0.0), "risky": (0.0, 0.0, 1.0)})
  np.testing.assert_array_equal(synthetic.true_weights("explain", custom), [0.0, 1.0, 0.0])
  for ex in synthetic.generate_task(custom)["train"]:
    assert ex["true_weights"][["factual", "explain", "risky"].index(ex["prompt_type"])] == 1.0
  with pytest.raises(ValueError, match="summing to 1"):
    synthetic.SyntheticTaskConfig(type_weights={"factual": (0.5, 0.2, 0.1), "explain": (0, 1, 0), "risky": (0, 0, 1)})
  with pytest.raises(ValueError, match="keys"):
    synthetic.SyntheticTaskConfig(type_weights={"factual": (1, 0, 0)})
  with pytest.raises(KeyError):
    synthetic.true_weights("playful", SMALL)


# ---------------------------------------------------------------------------------------------
# the theorem's inequality


def test_simplex_grid_and_theorem_sides_by_hand():
  # the one simplex grid (pro_jax.pro.weights), in the increasing row order the task's oracle_vs_fixed uses
  np.testing.assert_allclose(simplex_grid(3, 1 / 2)[::-1], [[0, 0, 1], [0, .5, .5], [0, 1, 0], [.5, 0, .5],
                                                            [.5, .5, 0], [1, 0, 0]])
  assert len(simplex_grid(3, 1 / 10)) == 66
  sides = synthetic.theorem_sides(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.2]]))
  assert sides["per_prompt_best"] == pytest.approx((1 + 1 + 0.5) / 3)
  assert sides["best_fixed"] == pytest.approx(1.5 / 3) and sides["best_fixed_index"] == 0
  assert sides["gap"] == pytest.approx(1.0 / 3)


def test_best_response_utilities_by_hand():
  stats = (np.zeros(2, np.float32), np.ones(2, np.float32))
  ex = {"scores": [[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]], "true_weights": [0.5, 0.5], "objectives": ["a", "b"]}
  u = synthetic.best_response_utilities([ex], np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), stats)
  np.testing.assert_allclose(u, [[0.5, 0.5, 0.6]])


def test_theorem_strict_on_the_task(task):
  stats = synthetic.reward_stats(task["train"])
  res = synthetic.oracle_vs_fixed(task["eval"], stats, grid_steps=10)
  assert res["oracle"] > res["best_fixed"] + 0.2
  assert res["theorem"]["per_prompt_best"] > res["theorem"]["best_fixed"] + 0.1
  assert res["oracle"] >= res["theorem"]["per_prompt_best"] - 1e-9
  assert res["best_fixed"] == pytest.approx(res["theorem"]["best_fixed"])
  # each prompt type alone: its own weights are at least as good as the best fixed weight
  for t in ("factual", "explain", "risky"):
    sub = [ex for ex in task["eval"] if ex["prompt_type"] == t]
    r = synthetic.oracle_vs_fixed(sub, stats, grid_steps=10)
    assert r["oracle"] >= r["best_fixed"] - 1e-9


def test_no_gap_when_all_types_share_weights():
  w = (0.5, 0.3, 0.2)  # on the grid
  cfg = synthetic.SyntheticTaskConfig(seed=0, n_train=200, n_eval=100, label_noise=0.0,
                                      type_weights={"factual": w, "explain": w, "risky": w})
  t = synthetic.generate_task(cfg)
  res = synthetic.oracle_vs_fixed(t["eval"], synthetic.reward_stats(t["train"]), grid_steps=10)
  assert res["oracle"] == pytest.approx(res["best_fixed"], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip(tmp_path, task):
  from transformers import AutoTokenizer

  path = synthetic.build_tokenizer(SMALL, tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(str(path))
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [4, 5, 6]
  assert len(tok) == 7 + len(synthetic.task_vocabulary(SMALL)) < 400
  humor = synthetic.generate_task(synthetic.SyntheticTaskConfig(seed=4, n_train=100, n_eval=0, humor=True))
  texts = []
  for ex in task["train"] + task["eval"] + humor["train"]:
    texts.append(ex["prompt"][0]["content"])
    texts.extend(ex["responses"])
  enc = tok(texts, add_special_tokens=False)["input_ids"]
  for text, ids in zip(texts, enc):
    assert tok.unk_token_id not in ids, text
    assert len(ids) == len(text.split())  # one token per space-separated word
    assert tok.decode(ids) == text
  rendered = tok.apply_chat_template([{"role": "user", "content": "how big is the zorb ?"}], tokenize=False,
                                     add_generation_prompt=True)
  assert rendered == "<bos><|user|> how big is the zorb ? <|assistant|>"
  assert tok.decode(tok(rendered, add_special_tokens=False)["input_ids"]) == \
      "<bos> <|user|> how big is the zorb ? <|assistant|>"
  assert tok("what is a xylophone ?", add_special_tokens=False)["input_ids"][3] == tok.unk_token_id
  # the conditioning texts: weights (RiC-style) and target rewards (RiC proper, negative values too)
  from pro_jax.pro.weights import format_rewards_text, format_weights_text
  names = ["concise", "informative", "harmless", "humor"]
  for cond in (format_weights_text([0.1, 0.2, 0.3, 0.4], names), format_rewards_text([-1.2, 0.0, 2.5, -0.3], names)):
    assert tok.unk_token_id not in tok(cond, add_special_tokens=False)["input_ids"], cond
