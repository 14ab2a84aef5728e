"""The world of the embedded synthetic task: what a text is worth (see `pro_jax.data.synthetic`).

Vocabulary of the closed world of made-up creatures, the task's settings (`SyntheticTaskConfig`,
with each prompt type's hidden weight vector), the seed's knowledge base, the prompt and sentence
tables that `parse_prompt` and the rewards read, the K programmatic reward functions
(`SyntheticRewards`, usable as a reward model on ANY text) and the word-level tokenizer that covers
every word of the world. Drawing prompts, candidate responses and (chosen, rejected) pairs from
this world is `pro_jax.data.synthetic` (which re-exports these names). See docs/synthetic_task.md
for every formula.
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


HOLDOUT_PERIOD = 20  # prompt combinations are split by a key in 0..19: fractions are in steps of 1/20


def holdout_keys(fraction: float) -> int:
  """How many of the HOLDOUT_PERIOD split keys a held-out fraction of the prompt combinations takes."""
  return int(round(float(fraction) * HOLDOUT_PERIOD))


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
    if not (holdout_keys(self.eval_fraction) >= 1 and holdout_keys(self.valid_fraction) >= 1
            and holdout_keys(self.eval_fraction) + holdout_keys(self.valid_fraction) < HOLDOUT_PERIOD):
      raise ValueError(f"eval_fraction and valid_fraction must each be >= {1 / HOLDOUT_PERIOD} and sum to "
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


def stream_rng(seed: int, stream: int) -> np.random.Generator:
  """The task's numpy random stream `stream` for `seed` (0: knowledge base; others: data splits)."""
  return np.random.default_rng([int(seed), int(stream)])


@functools.lru_cache(maxsize=32)
def _make_kb(seed: int, n_entities: int) -> KnowledgeBase:
  rng = stream_rng(seed, 0)
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


def fact_text(entity_ref: str, attr: str, value: str) -> str:
  """The sentence stating `attr` = `value` of `entity_ref` ("the <name>" or "it")."""
  return ATTRIBUTES[attr][1].format(e=entity_ref, v=value)


@functools.lru_cache(maxsize=1)
def _sentence_table() -> dict[tuple[str, ...], tuple]:
  """canonical sentence -> meaning: ("fact", attr, value) | ("step", i) | ("refusal",) |
  ("caution",) | ("filler",) | ("joke",)."""
  table: dict[tuple[str, ...], tuple] = {}
  ref = f"the {_ENTITY}"
  for attr, (values, _) in ATTRIBUTES.items():
    for v in values:
      table[tuple(_tok(fact_text(ref, attr, v)))] = ("fact", attr, v)
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
