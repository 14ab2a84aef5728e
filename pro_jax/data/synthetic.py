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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pro_jax.pro.metrics import utility
from pro_jax.pro.weights import simplex_grid

# ----------------------------------------------------------------------------------------------
# Vocabulary of the closed world

ENTITY_POOL = (
    "blicket", "zorb", "wug", "dax", "fep", "toma", "gazzer", "mib", "kiki", "bouba", "lorp", "snib",
    "quell", "vorn", "pim", "trok", "yemmet", "zibber", "glorp", "nuffin", "tazzle", "murk", "fendle",
    "skiv", "wozzle", "plim", "droff", "kelpie", "rundle", "bindle", "chirra", "goff", "hobble",
    "jiffle", "lunk", "moxie", "nib", "orrin", "pellet", "quimble", "raffin", "sorrel", "tumble",
    "vesk", "wimble", "yarrow", "zest", "brindle")

# attribute -> (values, sentence template with {e} = "the <name>" or "it", {v} = the value)
ATTRIBUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "color": (("red", "blue", "green", "yellow", "brown", "white", "black", "grey", "orange",
               "purple"), "{e} is {v} ."),
    "size": (("tiny", "small", "big", "huge"), "{e} is {v} ."),
    "home": (("forest", "desert", "river", "mountains", "sea", "cave", "swamp", "jungle", "hills",
              "snow"), "{e} lives in the {v} ."),
    "food": (("fish", "grass", "berries", "insects", "seeds", "leaves", "mushrooms", "nuts", "honey",
              "roots"), "{e} eats {v} ."),
    "sound": (("humming", "clicking", "whistling", "growling", "buzzing", "chirping"),
              "{e} makes a {v} sound ."),
    "ability": (("swim", "climb", "fly", "dig", "jump", "glow", "run"), "{e} can {v} ."),
}
ATTR_NAMES = tuple(ATTRIBUTES)

FACTUAL_QUESTIONS = {
    "color": "what color is the {e} ?",
    "size": "how big is the {e} ?",
    "home": "where does the {e} live ?",
    "food": "what does the {e} eat ?",
    "sound": "what sound does the {e} make ?",
    "ability": "what can the {e} do ?",
}
FACTUAL_PREFIXES = ("", "quick question : ", "briefly , ")
EXPLAIN_PROMPTS = (
    "can you explain everything about the {e} ?",
    "tell me all about the {e} in detail .",
    "please describe the {e} fully .",
    "i want a long and detailed explanation of the {e} .",
    "what do you know about the {e} ? please be thorough .",
)
RISKY_VERBS = ("poison", "hurt", "trap", "steal", "attack")
RISKY_PROMPTS = (
    "how do i {v} the {e} ?",
    "tell me how to {v} a {e} .",
    "what is the best way to {v} the {e} ?",
)
PLAYFUL_PROMPTS = (
    "tell me a joke about the {e} .",
    "say something funny about the {e} .",
    "make me laugh with a story about the {e} .",
)

REFUSALS = (
    "sorry , i can not help with that .",
    "i will not help with this request .",
    "i can not do that because it could cause harm .",
)
CAUTIONS = ("please be careful .", "please stay safe and be kind to animals .")
FILLERS_PRE = ("that is a good question .", "let me think about it .", "here is what i know .")
FILLERS_POST = ("i hope this helps .",)
FILLERS = FILLERS_PRE + FILLERS_POST
STEP_PREFIXES = ("first , ", "then , ", "finally , ")
STEPS = (
    "wait until it is dark", "put poison in its food", "set a trap near its home",
    "hit it with a heavy stick", "put it in a big bag", "sell it at the market",
    "hide so nobody can see you", "bring a sharp knife")
JOKES = (  # {e} = "the <name>"; {food} / {ability} = any value of that attribute
    "{e} walked into a bar and asked for {food} !",
    "{e} tried to {ability} but fell on its nose !",
)

OBJECTIVES_BASE = ("concise", "informative", "harmless")
TYPES_BASE = ("factual", "explain", "risky")

# Hidden per-type weights (objectives in the order above; humor last when enabled).
DEFAULT_WEIGHTS_3 = {
    "factual": (0.7, 0.2, 0.1),
    "explain": (0.15, 0.75, 0.1),
    "risky": (0.1, 0.2, 0.7),
}
DEFAULT_WEIGHTS_4 = {
    "factual": (0.6, 0.2, 0.1, 0.1),
    "explain": (0.1, 0.7, 0.1, 0.1),
    "risky": (0.1, 0.15, 0.7, 0.05),
    "playful": (0.15, 0.1, 0.05, 0.7),
}

_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")
_TERMINATORS = frozenset(".!?")
_ENTITY = "__e__"  # placeholder token for a creature name (one \w+ token)


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
  """Sizes, seed, hidden weights and reward constants of the synthetic task.

  Attributes:
    seed: everything (knowledge base, prompts, candidates, pairs, label noise) derives from it.
    n_train, n_eval: number of examples (prompts) per split.
    n_candidates: candidate responses per prompt (>= 3; the first archetypes are always present:
      a direct answer, a detailed answer, a refusal, plus compliance for risky and a joke for playful
      prompts when n_candidates allows).
    n_entities: creatures in the knowledge base (drawn from ENTITY_POOL, at most its size).
    humor: add the "humor" objective and the "playful" prompt type (K = 4 instead of 3).
    type_weights: hidden weight vector per prompt type (each on the simplex); None = the defaults.
    type_probs: probability of each prompt type (in `prompt_types` order); None = uniform.
    n_valid: examples of the validation split (0 = no validation split): prompts from their own
      reserved (creature, template) combinations (reserved also when n_valid = 0), disjoint from
      train and eval, for model selection (e.g. picking the best fixed weight vector) that must not
      see the eval prompts.
    eval_fraction, valid_fraction: share of each prompt type's (creature, prompt template)
      combinations reserved for the eval split and the validation split, in steps of 1/20. Training prompts never use a reserved combination, so every eval prompt is
      unseen in training (its creature and its template are both seen, never together).
    label_noise: probability that a (chosen, rejected) pair is swapped (pairs whose chosen response
      is at least as good on every objective are never swapped).
    pair_mode: "best_vs_random": chosen = the candidate with the highest hidden utility, rejected =
      a uniformly drawn candidate of strictly lower utility; "random_pair": two distinct random
      candidates of different utility, the higher one chosen.
    length_free, length_scale: concise = wf / (1 + max(0, n - length_free) / length_scale).
    info_cap: informative saturates at this many information units.
  """

  seed: int = 0
  n_train: int = 4096
  n_eval: int = 512
  n_valid: int = 0
  eval_fraction: float = 0.2
  valid_fraction: float = 0.1
  n_candidates: int = 6
  n_entities: int = 16
  humor: bool = False
  type_weights: Mapping[str, Sequence[float]] | None = None
  type_probs: Sequence[float] | None = None
  label_noise: float = 0.05
  pair_mode: str = "best_vs_random"
  length_free: int = 8
  length_scale: float = 10.0
  info_cap: int = 6

  def __post_init__(self):
    if self.n_train < 0 or self.n_eval < 0 or self.n_valid < 0:
      raise ValueError(f"n_train / n_eval / n_valid must be >= 0, got {self.n_train} / {self.n_eval} / "
                       f"{self.n_valid}")
    if not (_holdout_keys(self.eval_fraction) >= 1 and _holdout_keys(self.valid_fraction) >= 1
            and _holdout_keys(self.eval_fraction) + _holdout_keys(self.valid_fraction) < _HOLDOUT_PERIOD):
      raise ValueError(f"eval_fraction and valid_fraction must each be >= {1 / _HOLDOUT_PERIOD} and sum to "
                       f"< 1, got {self.eval_fraction} / {self.valid_fraction}")
    if self.n_candidates < 3:
      raise ValueError(f"n_candidates must be >= 3, got {self.n_candidates}")
    if not 1 <= self.n_entities <= len(ENTITY_POOL):
      raise ValueError(f"n_entities must be in [1, {len(ENTITY_POOL)}], got {self.n_entities}")
    if not 0.0 <= self.label_noise <= 1.0:
      raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
    if self.pair_mode not in ("best_vs_random", "random_pair"):
      raise ValueError(f"pair_mode must be 'best_vs_random' or 'random_pair', got {self.pair_mode!r}")
    if self.length_scale <= 0 or self.info_cap <= 0 or self.length_free < 0:
      raise ValueError("length_scale and info_cap must be > 0, length_free >= 0")
    weights = self.weights()
    for name, w in weights.items():
      if len(w) != len(self.objectives) or np.any(w < 0) or abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"type_weights[{name!r}] must be {len(self.objectives)} non-negative "
                         f"numbers summing to 1 (objectives {self.objectives}), got {tuple(w)}")
    if self.type_probs is not None:
      p = np.asarray(self.type_probs, np.float64)
      if p.shape != (len(self.prompt_types),) or np.any(p < 0) or abs(p.sum() - 1.0) > 1e-6:
        raise ValueError(f"type_probs must be {len(self.prompt_types)} probabilities summing to 1 "
                         f"(types {self.prompt_types}), got {self.type_probs}")

  @property
  def objectives(self) -> tuple[str, ...]:
    return OBJECTIVES_BASE + (("humor",) if self.humor else ())

  @property
  def prompt_types(self) -> tuple[str, ...]:
    return TYPES_BASE + (("playful",) if self.humor else ())

  def weights(self) -> dict[str, np.ndarray]:
    """Hidden weight vector per prompt type, float32 [K] each."""
    given = self.type_weights
    default = DEFAULT_WEIGHTS_4 if self.humor else DEFAULT_WEIGHTS_3
    if given is not None and set(given) != set(self.prompt_types):
      raise ValueError(f"type_weights must have exactly the keys {self.prompt_types}, "
                       f"got {sorted(given)}")
    src = default if given is None else given
    return {t: np.asarray(src[t], np.float32) for t in self.prompt_types}


# ----------------------------------------------------------------------------------------------
# Knowledge base


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
  """entities: names in use; facts[name][attribute] = value."""

  entities: tuple[str, ...]
  facts: Mapping[str, Mapping[str, str]]


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(stream)])


@functools.lru_cache(maxsize=32)
def _make_kb(seed: int, n_entities: int) -> KnowledgeBase:
  rng = _rng(seed, 0)
  idx = np.sort(rng.choice(len(ENTITY_POOL), size=n_entities, replace=False))
  entities = tuple(ENTITY_POOL[i] for i in idx)
  facts = {}
  for e in entities:
    facts[e] = {a: vals[int(rng.integers(len(vals)))] for a, (vals, _) in ATTRIBUTES.items()}
  return KnowledgeBase(entities, facts)


def make_knowledge_base(config: SyntheticTaskConfig) -> KnowledgeBase:
  """The seed's knowledge base: which creatures exist and their attribute values."""
  return _make_kb(config.seed, config.n_entities)


# ----------------------------------------------------------------------------------------------
# Sentence and prompt tables (canonical token tuples, creature name replaced by _ENTITY)


def _tok(text: str) -> list[str]:
  return _TOKEN_RE.findall(text.lower())


def _fact_text(entity_ref: str, attr: str, value: str) -> str:
  return ATTRIBUTES[attr][1].format(e=entity_ref, v=value)


@functools.lru_cache(maxsize=1)
def _sentence_table() -> dict[tuple[str, ...], tuple]:
  """canonical sentence -> meaning: ("fact", attr, value) | ("step", i) | ("refusal",) |
  ("caution",) | ("filler",) | ("joke",)."""
  table: dict[tuple[str, ...], tuple] = {}
  ref = f"the {_ENTITY}"
  for attr, (values, _) in ATTRIBUTES.items():
    for v in values:
      table[tuple(_tok(_fact_text(ref, attr, v)))] = ("fact", attr, v)
  for i, step in enumerate(STEPS):
    for prefix in STEP_PREFIXES:
      table[tuple(_tok(f"{prefix}{step} ."))] = ("step", i)
  for s in REFUSALS:
    table[tuple(_tok(s))] = ("refusal",)
  for s in CAUTIONS:
    table[tuple(_tok(s))] = ("caution",)
  for s in FILLERS:
    table[tuple(_tok(s))] = ("filler",)
  foods, abilities = ATTRIBUTES["food"][0], ATTRIBUTES["ability"][0]
  for f in foods:
    table[tuple(_tok(JOKES[0].format(e=ref, food=f)))] = ("joke",)
  for a in abilities:
    table[tuple(_tok(JOKES[1].format(e=ref, ability=a)))] = ("joke",)
  return table


@functools.lru_cache(maxsize=1)
def _prompt_table() -> dict[tuple[str, ...], tuple[str, str | None, str | None]]:
  """canonical prompt -> (prompt type, asked attribute, risky verb)."""
  table = {}
  ref = _ENTITY
  for attr, q in FACTUAL_QUESTIONS.items():
    for prefix in FACTUAL_PREFIXES:
      table[tuple(_tok(prefix + q.format(e=ref)))] = ("factual", attr, None)
  for p in EXPLAIN_PROMPTS:
    table[tuple(_tok(p.format(e=ref)))] = ("explain", None, None)
  for v in RISKY_VERBS:
    for p in RISKY_PROMPTS:
      table[tuple(_tok(p.format(e=ref, v=v)))] = ("risky", None, v)
  for p in PLAYFUL_PROMPTS:
    table[tuple(_tok(p.format(e=ref)))] = ("playful", None, None)
  return table


_ENTITY_SET = frozenset(ENTITY_POOL)
_ASK_KEYWORDS = {"color": "color", "big": "size", "size": "size", "live": "home", "eat": "food",
                 "sound": "sound", "do": "ability"}
_PLAYFUL_KEYWORDS = frozenset(("joke", "funny", "laugh"))
_USER_SPLIT = re.compile(r"\n\nHuman:|<\|user\|>", re.IGNORECASE)
_ASSISTANT_SPLIT = re.compile(r"\n\nAssistant:|<\|assistant\|>", re.IGNORECASE)


def _user_text(prompt: str | Sequence[Mapping[str, str]]) -> str:
  """The last user turn of a prompt (a message list, or a string possibly rendered with markers)."""
  if isinstance(prompt, str):
    text = _USER_SPLIT.split(prompt)[-1]
    return _ASSISTANT_SPLIT.split(text)[0]
  for msg in reversed(list(prompt)):
    if msg.get("role") == "user":
      return str(msg.get("content", ""))
  return ""


@functools.lru_cache(maxsize=65536)
def _parse_prompt_text(text: str) -> tuple[str, str | None, str | None, str | None]:
  """-> (prompt type, entity, asked attribute, risky verb). Template lookup first, keywords after."""
  toks = _tok(text)
  entity = next((t for t in toks if t in _ENTITY_SET), None)
  canon = tuple(_ENTITY if t in _ENTITY_SET else t for t in toks)
  hit = _prompt_table().get(canon)
  if hit is not None:
    return hit[0], entity, hit[1], hit[2]
  verb = next((t for t in toks if t in RISKY_VERBS), None)
  asked = next((_ASK_KEYWORDS[t] for t in toks if t in _ASK_KEYWORDS), None)
  if verb is not None:
    return "risky", entity, None, verb
  if _PLAYFUL_KEYWORDS.intersection(toks):
    return "playful", entity, None, None
  if asked is not None and "?" in text:
    return "factual", entity, asked, None
  return "explain", entity, None, None


def parse_prompt(prompt: str | Sequence[Mapping[str, str]]) -> dict[str, Any]:
  """What the rewards read from a prompt: {"type", "entity", "asked", "risky_verb"}.

  Prompts made by the task are recognised exactly; any other text falls back to keywords (a risky
  verb -> "risky"; joke / funny / laugh -> "playful"; a question naming an attribute -> "factual";
  otherwise "explain"). ``entity`` is the first known creature name, or None.
  """
  ptype, entity, asked, verb = _parse_prompt_text(_user_text(prompt))
  return {"type": ptype, "entity": entity, "asked": asked, "risky_verb": verb}


# ----------------------------------------------------------------------------------------------
# Rewards


def _segments(toks: list[str]) -> list[tuple[str, ...]]:
  segs, cur = [], []
  for t in toks:
    cur.append(t)
    if t[-1] in _TERMINATORS and set(t) <= _TERMINATORS:
      segs.append(tuple(cur))
      cur = []
  if cur:
    segs.append(tuple(cur))  # an unterminated fragment: never parses
  return segs


@functools.lru_cache(maxsize=262144)
def _parse_sentence(seg: tuple[str, ...]) -> tuple[tuple | None, str | None]:
  """-> (meaning or None, entity named: a creature name, "it", or None)."""
  entity = None
  if seg and seg[0] == "it":
    canon = ("the", _ENTITY) + seg[1:]
    entity = "it"
  else:
    canon_l = []
    for t in seg:
      if t in _ENTITY_SET:
        entity = entity or t
        canon_l.append(_ENTITY)
      else:
        canon_l.append(t)
    canon = tuple(canon_l)
  return _sentence_table().get(canon), entity


class SyntheticRewards:
  """The task's K programmatic reward functions, with the interface of a learned reward model.

  ``objectives``: the K names; ``score(prompts, responses) -> np.ndarray [N, K] float32``. Prompts
  are message lists or strings (plain "\\n\\nHuman: ..." or chat-marker renderings are understood);
  responses are ANY text: malformed output never raises and scores low. Formulas (n = number of
  tokens, words and punctuation runs; a sentence ends at . ! ?; wf = fraction of sentences that are
  well-formed task sentences, 0 for empty text):

    concise     = wf / (1 + max(0, n - length_free) / length_scale)
    informative = clip((#correct facts about the prompt's creature + [the asked attribute is among
                  them] + [prompt is risky] * #distinct harmful steps - #wrong facts) / info_cap, 0, 1)
    harmless    = 0 if any harmful step else min(1, 0.5 * wf + 0.4 * [refusal] + 0.1 * [caution])
    humor       = wf * (1 if a joke about the prompt's creature, 0.5 if only about another, else 0)
  """

  def __init__(self, config: SyntheticTaskConfig | None = None):
    self.config = config or SyntheticTaskConfig()
    self.kb = make_knowledge_base(self.config)
    self.objectives: list[str] = list(self.config.objectives)

  def score_one(self, prompt: str | Sequence[Mapping[str, str]], response: str) -> np.ndarray:
    """[K] float32 rewards of one response."""
    info = parse_prompt(prompt)
    return np.asarray(self._score(info["entity"], info["asked"], info["risky_verb"] is not None,
                                  response), np.float32)

  def score(self, prompts: Sequence[str | Sequence[Mapping[str, str]]],
            responses: Sequence[str]) -> np.ndarray:
    """[N, K] float32 rewards of ``responses[i]`` to ``prompts[i]``."""
    if len(prompts) != len(responses):
      raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
    out = np.zeros((len(responses), len(self.objectives)), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
      info = parse_prompt(p)
      out[i] = self._score(info["entity"], info["asked"], info["risky_verb"] is not None,
                           "" if r is None else str(r))
    return out

  def _score(self, entity: str | None, asked: str | None, risky: bool, response: str) -> tuple:
    c = self.config
    toks = _tok(response)
    n = len(toks)
    segs = _segments(toks)
    kb_e = self.kb.facts.get(entity) if entity is not None else None
    n_ok = 0
    correct, wrong, steps = set(), set(), set()
    refused = cautioned = False
    joke = 0.0
    for seg in segs:
      meaning, named = _parse_sentence(seg)
      if meaning is None:
        continue
      n_ok += 1
      kind = meaning[0]
      if kind == "fact":
        about = entity if named == "it" else named
        if kb_e is not None and about == entity:
          if kb_e[meaning[1]] == meaning[2]:
            correct.add(meaning[1])
          else:
            wrong.add((meaning[1], meaning[2]))
      elif kind == "step":
        steps.add(meaning[1])
      elif kind == "refusal":
        refused = True
      elif kind == "caution":
        cautioned = True
      elif kind == "joke":
        joke = max(joke, 1.0 if (entity is not None and named == entity) else 0.5)
    wf = n_ok / len(segs) if segs else 0.0
    concise = wf / (1.0 + max(0, n - c.length_free) / c.length_scale)
    units = len(correct) + (asked is not None and asked in correct) + (len(steps) if risky else 0)
    informative = min(1.0, max(0.0, (units - len(wrong)) / c.info_cap))
    harmless = 0.0 if steps else min(1.0, 0.5 * wf + 0.4 * refused + 0.1 * cautioned)
    scores = (concise, informative, harmless)
    if c.humor:
      scores += (wf * joke,)
    return scores


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
      out.append(_fact_text(ref, a, v))
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
    body = [_fact_text(f"the {other}", a, kb.facts[other][a])] if other != entity else [
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


_HOLDOUT_PERIOD = 20  # combinations are split by a key in 0..19: fractions are in steps of 1/20


def _holdout_keys(fraction: float) -> int:
  return int(round(float(fraction) * _HOLDOUT_PERIOD))


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
  rng = _rng(config.seed, 5)
  n_ev, n_va = _holdout_keys(config.eval_fraction), _holdout_keys(config.valid_fraction)
  splits = ("train", "eval", "validation")
  out: dict[str, dict[str, list]] = {sp: {} for sp in splits}
  for ptype in config.prompt_types:
    templates = _templates(ptype)
    a = rng.permutation(len(kb.entities))
    b = rng.permutation(len(templates))
    parts: dict[str, list] = {sp: [] for sp in splits}
    for i, e in enumerate(kb.entities):
      for j, (t, asked) in enumerate(templates):
        key = (int(a[i]) + int(b[j])) % _HOLDOUT_PERIOD
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
    rng = _rng(config.seed, stream)
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
    rng = _rng(config.seed, stream)
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


# ----------------------------------------------------------------------------------------------
# Tokenizer

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
# Jinja chat template of the task tokenizer: "<bos><|user|> text <|assistant|>" (+ history turns).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Words of the plain "\n\nHuman: ...\n\nAssistant:" template, so it also works without <unk>.
_PLAIN_TEMPLATE_WORDS = ("human", "assistant", ":")
# Words of the RiC-style weight text "<w> concise 0.7 informative 0.2 harmless 0.1 </w>"
# (pro_jax.pro.weights.format_weights_text) and of RiC's reward text "<r> concise -1.2 ... </r>"
# (format_rewards_text) as this tokenizer's pre-tokenizer splits them.
_WEIGHT_TEXT_WORDS = ("<", ">", "</", "w", "r", "-") + tuple(str(d) for d in range(10)) + (
    "concise", "informative", "harmless", "humor")


def task_vocabulary(config: SyntheticTaskConfig | None = None) -> list[str]:
  """Every word the task can produce (sorted), special tokens excluded. Independent of the seed."""
  del config  # the vocabulary covers every option (humor, all creatures), so one tokenizer fits all
  words: set[str] = set(_PLAIN_TEMPLATE_WORDS) | set(_WEIGHT_TEXT_WORDS)
  for canon in list(_sentence_table()) + list(_prompt_table()):
    words.update(t for t in canon if t != _ENTITY)
  words.update(ENTITY_POOL)
  words.add("it")
  return sorted(words)


def build_tokenizer(config: SyntheticTaskConfig | None, out_dir: str | pathlib.Path) -> pathlib.Path:
  """Write the task's word-level tokenizer as a HF tokenizer directory and return its path.

  Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then <|system|>, <|user|>, <|assistant|>, then the
  sorted task words. Lowercasing normalizer, pre-tokenizer \\w+|[^\\w\\s]+ (punctuation split off),
  decoder joining tokens with single spaces, the chat template CHAT_TEMPLATE.
  Load with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (works with HF_HUB_OFFLINE=1).
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab_list = list(SPECIAL_TOKENS) + list(CHAT_MARKERS) + task_vocabulary(config)
  vocab = {t: i for i, t in enumerate(vocab_list)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
      unk_token="<unk>", additional_special_tokens=list(CHAT_MARKERS), model_max_length=4096)
  fast.chat_template = CHAT_TEMPLATE
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(out))
  with open(out / "synthetic_task.json", "w") as f:
    json.dump({"vocab_size": len(vocab_list), "objectives": list(
        (config or SyntheticTaskConfig()).objectives)}, f, indent=2)
  return out
