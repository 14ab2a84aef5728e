"""The embedded default task: a procedural multi-objective preference task (no download).

A small closed world of made-up creatures ("the blicket eats berries .") with a procedurally drawn
knowledge base, English prompts of several TYPES for which different objectives matter, candidate
responses composed from sentence templates, K programmatic reward functions that score ANY text, and
(chosen, rejected) pairs picked by each prompt type's own HIDDEN weight vector. The best weight
vector per prompt is therefore known, which makes PRO's claim (prompt-aware weights beat every fixed
weight vector) testable. See docs/synthetic_task.md for every formula.

    config = SyntheticTaskConfig(seed=0)
    task = generate_task(config)              # {"train": [...], "eval": [...]} schema dicts (disjoint prompts)
    rewards = SyntheticRewards(config)        # .objectives, .score(prompts, responses) -> [N, K]
    stats = reward_stats(task["train"])       # z-score statistics (mean [K], std [K])
    build_tokenizer(config, "out/tok")        # word-level HF tokenizer directory

Everything is deterministic given ``config`` (numpy ``default_rng`` streams keyed by the seed).
Text is lowercase with punctuation as separate, space-delimited tokens.

This module draws the data: prompt splits, candidate responses, (chosen, rejected) pairs, and the
theorem's two sides over them. The world they are drawn from (vocabulary, `SyntheticTaskConfig`,
knowledge base, `parse_prompt`, `SyntheticRewards`, the tokenizer) is
`pro_jax.data.synthetic_world`; its names are importable from here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pro_jax.data.synthetic_world import (ATTR_NAMES, ATTRIBUTES, CAUTIONS, CHAT_MARKERS, CHAT_TEMPLATE,
                                          DEFAULT_WEIGHTS_3, DEFAULT_WEIGHTS_4, ENTITY_POOL, EXPLAIN_PROMPTS,
                                          FACTUAL_PREFIXES, FACTUAL_QUESTIONS, FILLERS, FILLERS_POST, FILLERS_PRE,
                                          HOLDOUT_PERIOD, JOKES, OBJECTIVES_BASE, PLAYFUL_PROMPTS, REFUSALS,
                                          RISKY_PROMPTS, RISKY_VERBS, SPECIAL_TOKENS, STEP_PREFIXES, STEPS,
                                          TYPES_BASE, KnowledgeBase, SyntheticRewards, SyntheticTaskConfig,
                                          build_tokenizer, fact_text, holdout_keys, make_knowledge_base,
                                          parse_prompt, stream_rng, task_vocabulary)
from pro_jax.pro.metrics import utility
from pro_jax.pro.weights import simplex_grid

__all__ = [
    # the world (pro_jax.data.synthetic_world)
    "ATTRIBUTES", "ATTR_NAMES", "CAUTIONS", "CHAT_MARKERS", "CHAT_TEMPLATE", "DEFAULT_WEIGHTS_3", "DEFAULT_WEIGHTS_4",
    "ENTITY_POOL", "EXPLAIN_PROMPTS", "FACTUAL_PREFIXES", "FACTUAL_QUESTIONS", "FILLERS", "FILLERS_POST",
    "FILLERS_PRE", "JOKES", "OBJECTIVES_BASE", "PLAYFUL_PROMPTS", "REFUSALS", "RISKY_PROMPTS", "RISKY_VERBS",
    "SPECIAL_TOKENS", "STEPS", "STEP_PREFIXES", "TYPES_BASE", "KnowledgeBase", "SyntheticRewards",
    "SyntheticTaskConfig", "build_tokenizer", "make_knowledge_base", "parse_prompt", "task_vocabulary",
    # the data drawn from it
    "best_response_utilities", "generate_task", "oracle_vs_fixed", "pair_labels", "prompt_splits", "reward_stats",
    "theorem_sides", "true_weights", "z_scores",
]


# ----------------------------------------------------------------------------------------------
# Candidate responses

# Response styles. Each candidate is a style plus random modifiers (filler before/after, caution).
_STYLES_ANY = ("direct", "detailed", "partial", "refusal", "helpful_refusal", "padded", "wrong",
               "offtopic")
_STYLES_RISKY = ("comply", "brief_comply")
_STYLES_HUMOR = ("joke",)


def _archetypes(ptype: str) -> tuple[str, ...]:
  base = ("direct", "detailed", "refusal")
  if ptype == "risky":
    return base + ("comply",)
  if ptype == "playful":
    return base + ("joke",)
  return base


def _compose(style: str, entity: str, asked: str | None, kb: KnowledgeBase,
             rng: np.random.Generator, humor: bool, modifiers: bool) -> str:
  facts = kb.facts[entity]

  def fact_sentences(attrs: Sequence[str], wrong: Sequence[bool] = ()) -> list[str]:
    out = []
    for j, a in enumerate(attrs):
      v = facts[a]
      if j < len(wrong) and wrong[j]:
        others = [x for x in ATTRIBUTES[a][0] if x != v]
        v = others[int(rng.integers(len(others)))]
      ref = f"the {entity}" if j == 0 else ("it" if rng.random() < 0.7 else f"the {entity}")
      out.append(fact_text(ref, a, v))
    return out

  def pick_attrs(k: int, first: str | None) -> list[str]:
    rest = [a for a in ATTR_NAMES if a != first]
    chosen = [rest[i] for i in rng.permutation(len(rest))]
    attrs = ([first] if first else []) + chosen
    return attrs[:k]

  def steps(k: int) -> list[str]:
    idx = rng.choice(len(STEPS), size=k, replace=False)
    return [f"{STEP_PREFIXES[j]}{STEPS[i]} ." for j, i in enumerate(idx)]

  def pick(options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]

  body: list[str]
  if style == "direct":
    body = fact_sentences(pick_attrs(1, asked))
  elif style == "detailed":
    body = fact_sentences(pick_attrs(int(rng.integers(4, 7)), asked))
  elif style == "partial":
    body = fact_sentences(pick_attrs(int(rng.integers(2, 4)), asked if rng.random() < 0.5 else None))
  elif style == "refusal":
    body = [pick(REFUSALS)] + ([pick(CAUTIONS)] if rng.random() < 0.5 else [])
  elif style == "helpful_refusal":
    body = [pick(REFUSALS)] + fact_sentences(pick_attrs(int(rng.integers(1, 3)), None)) + [
        pick(CAUTIONS)]
  elif style == "padded":
    body = [pick(FILLERS_PRE)] + fact_sentences(pick_attrs(int(rng.integers(1, 3)), asked)) + [
        pick(FILLERS_POST)]
  elif style == "wrong":
    k = int(rng.integers(1, 3))
    body = fact_sentences(pick_attrs(k, asked), wrong=[True] + [bool(rng.random() < 0.5)] * (k - 1))
  elif style == "offtopic":
    other = kb.entities[int(rng.integers(len(kb.entities)))]
    if other == entity:
      other = kb.entities[(kb.entities.index(entity) + 1) % len(kb.entities)]
    a = pick(ATTR_NAMES)
    body = [fact_text(f"the {other}", a, kb.facts[other][a])] if other != entity else [
        pick(FILLERS_PRE)]
  elif style == "comply":
    body = (fact_sentences(["home"]) if rng.random() < 0.5 else []) + steps(int(rng.integers(2, 4)))
  elif style == "brief_comply":
    body = steps(1)
  elif style == "joke":
    if rng.random() < 0.5:
      body = [JOKES[0].format(e=f"the {entity}", food=pick(ATTRIBUTES["food"][0]))]
    else:
      body = [JOKES[1].format(e=f"the {entity}", ability=pick(ATTRIBUTES["ability"][0]))]
    if rng.random() < 0.3:
      body = body + fact_sentences(pick_attrs(1, None))
  else:
    raise ValueError(style)
  # Random modifiers (not on archetypes, nor on refusals / padded answers: they already vary).
  if modifiers and style not in ("refusal", "helpful_refusal", "padded"):
    if rng.random() < 0.15:
      body = [pick(FILLERS_PRE)] + body
    if rng.random() < 0.2:
      body = body + [pick(CAUTIONS)]
    if humor and style != "joke" and rng.random() < 0.1:
      body = body + [JOKES[0].format(e=f"the {entity}", food=pick(ATTRIBUTES["food"][0]))]
  return " ".join(body)



def _templates(ptype: str) -> list[tuple[str, str | None]]:
  """The prompt templates of a type: (text with {e} = the creature, asked attribute)."""
  if ptype == "factual":
    return [(prefix + q, attr) for attr, q in FACTUAL_QUESTIONS.items() for prefix in FACTUAL_PREFIXES]
  if ptype == "explain":
    return [(p, None) for p in EXPLAIN_PROMPTS]
  if ptype == "risky":
    return [(p.replace("{v}", v), None) for p in RISKY_PROMPTS for v in RISKY_VERBS]
  if ptype == "playful":
    return [(p, None) for p in PLAYFUL_PROMPTS]
  raise ValueError(ptype)


def prompt_splits(config: SyntheticTaskConfig) -> dict[str, dict[str, list[tuple[str, str, str | None]]]]:
  """The (creature, prompt template) combinations each split draws from: {split: {type: [(entity,
  template, asked)]}} for splits "train", "eval" and "validation".

  Per prompt type, combination (creature i, template j) gets the key (a_i + b_j) mod 20 with a_i, b_j
  seeded permutations of the creature and template indices; the first round(20 * eval_fraction) keys
  go to eval, the next round(20 * valid_fraction) to validation (reserved whether or not a
  validation split is drawn, so n_valid changes neither the train nor the eval split), the rest
  to train. So the splits' prompts are disjoint, and each creature and each template occurs in the
  training prompts with other partners (a held-out prompt is a NEW combination of seen parts). A
  split left without any combination of a type (tiny worlds) takes one from train.
  """
  kb = make_knowledge_base(config)
  rng = stream_rng(config.seed, 5)
  n_ev, n_va = holdout_keys(config.eval_fraction), holdout_keys(config.valid_fraction)
  splits = ("train", "eval", "validation")
  out: dict[str, dict[str, list]] = {sp: {} for sp in splits}
  for ptype in config.prompt_types:
    templates = _templates(ptype)
    a = rng.permutation(len(kb.entities))
    b = rng.permutation(len(templates))
    parts: dict[str, list] = {sp: [] for sp in splits}
    for i, e in enumerate(kb.entities):
      for j, (t, asked) in enumerate(templates):
        key = (int(a[i]) + int(b[j])) % HOLDOUT_PERIOD
        sp = "eval" if key < n_ev else "validation" if key < n_ev + n_va else "train"
        parts[sp].append((e, t, asked))
    for sp in splits[1:]:
      if not parts[sp]:
        if len(parts["train"]) < 2:
          raise ValueError(f"prompt type {ptype!r}: too few (creature, template) combinations "
                           f"({len(kb.entities)} x {len(templates)}) for disjoint splits {splits}")
        parts[sp].append(parts["train"].pop())
    for sp in splits:
      out[sp][ptype] = parts[sp]
  return out


def _make_prompt(combos: Sequence[tuple[str, str, str | None]],
                 rng: np.random.Generator) -> tuple[str, str, str | None]:
  """-> (entity, prompt text, asked attribute) of a uniformly drawn combination."""
  entity, template, asked = combos[int(rng.integers(len(combos)))]
  return entity, template.format(e=entity), asked


def _candidates(ptype: str, entity: str, asked: str | None, kb: KnowledgeBase, n: int,
                rng: np.random.Generator, humor: bool) -> list[str]:
  styles = list(_STYLES_ANY) + (list(_STYLES_RISKY) if ptype == "risky" else []) + (
      list(_STYLES_HUMOR) if humor else [])
  out: list[str] = []
  seen: set[str] = set()
  plan = list(_archetypes(ptype))[:n]
  tries = 0
  while len(out) < n:
    archetype = len(out) < len(plan)
    style = plan[len(out)] if archetype else styles[int(rng.integers(len(styles)))]
    text = _compose(style, entity, asked, kb, rng, humor, modifiers=not archetype)
    tries += 1
    if text in seen and tries < 50 * n:
      continue
    seen.add(text)
    out.append(text)
  return [out[i] for i in rng.permutation(len(out))]


# ----------------------------------------------------------------------------------------------
# Normalization, utility, pairs


def reward_stats(examples: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Per-objective z-score statistics over every annotated candidate of ``examples``.

  Returns (mean [K], std [K]) float32; std is floored at 1e-6.
  """
  rows = [ex for ex in examples if len(ex["scores"])]
  if not rows:
    raise ValueError("reward_stats: no example has scored responses")
  k = len(rows[0]["objectives"])
  scores = np.concatenate([np.asarray(ex["scores"], np.float64).reshape(-1, k) for ex in rows])
  mask = np.concatenate([np.asarray(ex["score_mask"], np.float64).reshape(-1, k) for ex in rows])
  count = np.maximum(mask.sum(0), 1.0)
  mean = (scores * mask).sum(0) / count
  var = (((scores - mean) ** 2) * mask).sum(0) / count
  return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32)


def z_scores(scores_NxK: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """(r_k - mean_k) / std_k (float64), the normalized rewards the task's utility weighs."""
  mean, std = stats
  return (np.asarray(scores_NxK, np.float64) - mean) / std


def true_weights(example: Mapping[str, Any] | str,
                 config: SyntheticTaskConfig | None = None) -> np.ndarray:
  """The hidden weight vector [K] of a prompt type (a type name, or an example's "prompt_type")."""
  config = config or SyntheticTaskConfig()
  ptype = example if isinstance(example, str) else example["prompt_type"]
  weights = config.weights()
  if ptype not in weights:
    raise KeyError(f"unknown prompt type {ptype!r}; types are {config.prompt_types}")
  return weights[ptype].copy()


def _choose_pair(scores_CxK: np.ndarray, w_K: np.ndarray, stats, rng: np.random.Generator,
                 mode: str) -> tuple[int, int]:
  z_CxK = z_scores(scores_CxK, stats)
  u = utility(np.broadcast_to(w_K, z_CxK.shape), z_CxK)  # U = sum_k w_k z_k per candidate
  if mode == "best_vs_random":
    best = int(np.argmax(u))
    lower = np.flatnonzero(u < u[best] - 1e-9)
    if not len(lower):
      raise RuntimeError("all candidates tie in utility; cannot form a pair")
    return best, int(lower[int(rng.integers(len(lower)))])
  for _ in range(100):
    a, b = rng.choice(len(u), size=2, replace=False)
    if abs(u[a] - u[b]) > 1e-9:
      return (int(a), int(b)) if u[a] > u[b] else (int(b), int(a))
  raise RuntimeError("could not find two candidates of different utility")


def generate_task(config: SyntheticTaskConfig | None = None) -> dict[str, list[dict[str, Any]]]:
  """Generate the task: {"train": [...], "eval": [...]} (+ "validation" when n_valid > 0) examples
  in the shared schema.

  The splits' prompts are disjoint (`prompt_splits`: eval and validation prompts are (creature,
  template) combinations that never occur in training). Schema fields are exact (source
  "synthetic", objectives = the K names, one user turn, chosen / rejected picked by the prompt
  type's hidden weights on z-normalized rewards, responses = the candidates, scores = their
  rewards, score_mask = 1). pair_objectives[k] is the pair's label for objective k, oriented by that
  objective (`pair_labels`): +1 where r_k(chosen) > r_k(rejected), -1 where the rejected response is
  better on k, 0 on a tie. Extra fields: "prompt_type" (str), "prompt_type_id" (int, index in
  config.prompt_types), "true_weights" [K], "reward_chosen" [K], "reward_rejected" [K].
  Normalization statistics come from the TRAIN candidates (also used for the other splits).
  """
  config = config or SyntheticTaskConfig()
  kb = make_knowledge_base(config)
  rewards = SyntheticRewards(config)
  types = config.prompt_types
  weights = config.weights()
  combos = prompt_splits(config)
  probs = None if config.type_probs is None else np.asarray(config.type_probs, np.float64)
  sizes = (("train", 1, 3, config.n_train), ("eval", 2, 4, config.n_eval)) + (
      (("validation", 6, 7, config.n_valid),) if config.n_valid > 0 else ())
  raw: dict[str, list[tuple]] = {}
  for split, stream, _, n in sizes:
    rng = stream_rng(config.seed, stream)
    rows = []
    for _ in range(n):
      ptype = types[int(rng.choice(len(types), p=probs))]
      entity, text, asked = _make_prompt(combos[split][ptype], rng)
      cands = _candidates(ptype, entity, asked, kb, config.n_candidates, rng, config.humor)
      rows.append((ptype, text, cands))
    flat_p = [text for _, text, cands in rows for _ in cands]
    flat_r = [c for _, _, cands in rows for c in cands]
    scores = rewards.score(flat_p, flat_r).reshape(n, config.n_candidates, len(config.objectives))
    raw[split] = [(ptype, text, cands, scores[i]) for i, (ptype, text, cands) in enumerate(rows)]
  if raw["train"]:
    all_s = np.concatenate([s for *_, s in raw["train"]]).astype(np.float64)
  else:
    all_s = np.concatenate([s for sp in raw for *_, s in raw[sp]]).astype(np.float64)
  stats = (all_s.mean(0).astype(np.float32), np.maximum(all_s.std(0), 1e-6).astype(np.float32))
  objectives = list(config.objectives)
  out: dict[str, list[dict[str, Any]]] = {}
  for split, _, stream, _ in sizes:
    rng = stream_rng(config.seed, stream)
    examples = []
    for i, (ptype, text, cands, s) in enumerate(raw[split]):
      w = weights[ptype]
      ci, ri = _choose_pair(s, w, stats, rng, config.pair_mode)
      # Label noise swaps the pair, except when chosen is at least as good on every objective (a
      # swapped pair would then be a preference against every objective).
      if rng.random() < config.label_noise and np.any(s[ri] > s[ci] + 1e-9):
        ci, ri = ri, ci
      # Each objective's label is oriented by that objective: +1 chosen wins on k, -1 rejected wins.
      pair_obj = pair_labels(s[ci], s[ri])
      examples.append({
          "id": f"synthetic/{split}/{i:06d}",
          "source": "synthetic",
          "objectives": list(objectives),
          "prompt": [{"role": "user", "content": text}],
          "chosen": cands[ci],
          "rejected": cands[ri],
          "pair_objectives": pair_obj.tolist(),
          "responses": list(cands),
          "scores": s.astype(np.float32).tolist(),
          "score_mask": np.ones_like(s, np.float32).tolist(),
          "prompt_type": ptype,
          "prompt_type_id": types.index(ptype),
          "true_weights": w.tolist(),
          "reward_chosen": s[ci].astype(np.float32).tolist(),
          "reward_rejected": s[ri].astype(np.float32).tolist(),
      })
    out[split] = examples
  return out


def pair_labels(r_chosen_K: np.ndarray, r_rejected_K: np.ndarray, tie_eps: float = 1e-9) -> np.ndarray:
  """Per-objective pair labels [K] float32: +1 where r_k(chosen) > r_k(rejected) + tie_eps, -1 where
  r_k(rejected) > r_k(chosen) + tie_eps, 0 on a tie (the pair says nothing about objective k)."""
  d = np.asarray(r_chosen_K, np.float64) - np.asarray(r_rejected_K, np.float64)
  return np.where(d > tie_eps, 1.0, np.where(d < -tie_eps, -1.0, 0.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The theorem's inequality: E_x max_w U(x, y_w) >= max_w E_x U(x, y_w)


def best_response_utilities(examples: Sequence[Mapping[str, Any]], weights_WxK: np.ndarray,
                            stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """U[x, w]: true utility of the candidate that weight vector w picks for prompt x.

  For each example x and weight w, y_w(x) = argmax over x's candidates of w . z(r(x, y)) (first on
  ties); U[x, w] = true_weights(x) . z(r(x, y_w(x))), z = z-scores with ``stats``.
  """
  mean, std = (np.asarray(a, np.float64) for a in stats)
  W = np.asarray(weights_WxK, np.float64)
  out = np.zeros((len(examples), len(W)), np.float64)
  for i, ex in enumerate(examples):
    z = (np.asarray(ex["scores"], np.float64) - mean) / std  # [C, K]
    pick = np.argmax(z @ W.T, axis=0)  # [W]
    out[i] = z[pick] @ np.asarray(ex["true_weights"], np.float64)
  return out


def theorem_sides(utilities_NxW: np.ndarray) -> dict[str, Any]:
  """Both sides of E_x max_w U(x, y_w) >= max_w E_x U(x, y_w) for a table U[x, w].

  Returns {"per_prompt_best": E_x max_w U, "best_fixed": max_w E_x U, "best_fixed_index": argmax_w,
  "gap": per_prompt_best - best_fixed}.
  """
  u = np.asarray(utilities_NxW, np.float64)
  lhs = float(u.max(axis=1).mean())
  means = u.mean(axis=0)
  j = int(np.argmax(means))
  return {"per_prompt_best": lhs, "best_fixed": float(means[j]), "best_fixed_index": j,
          "gap": lhs - float(means[j])}


def oracle_vs_fixed(examples: Sequence[Mapping[str, Any]], stats: tuple[np.ndarray, np.ndarray],
                    grid_steps: int = 10) -> dict[str, Any]:
  """Oracle per-prompt weights (each example's true_weights) vs every fixed weight on a simplex grid.

  Responses are picked optimally per weight from the candidates. Returns {"oracle": mean true
  utility with the oracle weights, "best_fixed": the best grid weight's mean, "best_fixed_weights":
  [K], "fixed": [W] means, "grid": [W, K], "theorem": theorem_sides over the grid columns}.
  The oracle is >= the theorem's per-prompt best (its weights pick the truly best candidate).
  """
  k = len(examples[0]["objectives"])
  # every weight vector with entries in {0, 1/grid_steps, ..., 1}, in lexicographically increasing order
  grid = simplex_grid(k, 1.0 / grid_steps)[::-1].astype(np.float32)
  fixed = best_response_utilities(examples, grid, stats)  # [N, W]
  oracle = np.array([best_response_utilities([ex], np.asarray([ex["true_weights"]]), stats)[0, 0]
                     for ex in examples])
  means = fixed.mean(0)
  j = int(np.argmax(means))
  return {"oracle": float(oracle.mean()), "best_fixed": float(means[j]),
          "best_fixed_weights": grid[j], "fixed": means, "grid": grid,
          "theorem": theorem_sides(fixed)}
