"""NVIDIA HelpSteer2: responses rated 0-4 on five attributes, grouped by prompt.

Config ``hf`` -- the Hugging Face release (``nvidia/HelpSteer2``), one JSON object per line::

  {"prompt": str, "response": str, "helpfulness": 3, "correctness": 4, "coherence": 4,
   "complexity": 2, "verbosity": 1}

  manual_dir layout: ``<manual_dir>/train.jsonl.gz`` and ``<manual_dir>/validation.jsonl.gz`` (as
  in the HF repo; ``.jsonl`` also accepted). Multi-turn prompts hold earlier turns as
  ``"{user 1}\\n<extra_id_1>Assistant\\n{assistant 1}\\n<extra_id_1>User\\n{user 2}"``; they are
  split into turns.

Config ``steerlm`` -- NeMo-Aligner's SteerLM regression-reward-model jsonl, as in
shared/data/helpsteer2/test-rm.jsonl::

  {"text": "<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{user}\\n<extra_id_1>Assistant\\n"
           "{response}\\n<extra_id_2>", "label": [9 floats]}

  label order: quality, toxicity, humor, creativity, helpfulness, correctness, coherence,
  complexity, verbosity; -100 = not annotated. Only the last five (HelpSteer2's attributes) are
  kept. The system message becomes a "system" turn when it is not empty.
  manual_dir layout: ``<manual_dir>/{train,val,test}*.jsonl`` -> splits train / validation / test.

Both: objectives ``["helpfulness", "correctness", "coherence", "complexity", "verbosity"]``;
the rows of one prompt (identical prompt text; consecutive in the release) form one example with
responses [N] and scores [N, 5] (score_mask 0 where not annotated). A pair is added when the
helpfulness ratings differ: chosen = the most helpful (first on ties), rejected = the least
helpful, ``pair_objectives = [1, 0, 0, 0, 0]`` (the pair speaks for helpfulness only; complexity
and verbosity are not "higher is better"). Each file row is validated alone, so a bad row drops
only its own response.
"""

from __future__ import annotations

import json
import re
from typing import Iterator, Sequence

from pro_jax.data.builders.common import (PreferenceBuilder, PreferenceConfig, Scored, get,
                                          group_scored, number, pair_by, text)
from pro_jax.data.errors import DataError
from pro_jax.data.validate import RowPolicy

OBJECTIVES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
STEERLM_LABELS = ("quality", "toxicity", "humor", "creativity") + OBJECTIVES
NOT_ANNOTATED = -100.0
_HF_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")
_SYSTEM = "<extra_id_0>System\n"
_TURN_SEP = "\n<extra_id_1>"
_END = "<extra_id_2>"


def split_hf_prompt(prompt: str) -> list[dict]:
  """The HF release's prompt string -> user / assistant turns (single-turn: one user turn)."""
  parts = _HF_TURN.split(prompt)
  turns = [{"role": "user", "content": parts[0].strip()}]
  for role, content in zip(parts[1::2], parts[2::2]):
    turns.append({"role": role.lower(), "content": content.strip()})
  return turns


def parse_hf(obj: dict, *, file: str, row: int) -> Scored:
  prompt_text = text(obj, "prompt", file=file, row=row, strip=False)
  response = text(obj, "response", file=file, row=row)
  scores = [number(get(obj, name, file=file, row=row), name, file=file, row=row)
            for name in OBJECTIVES]
  return Scored(key=prompt_text, prompt=split_hf_prompt(prompt_text), response=response,
                scores=scores, mask=[1.0] * len(OBJECTIVES), file=file, row=row)


def split_steerlm_text(value: str, *, file=None, row=None) -> tuple[list[dict], str]:
  """NeMo chat-template text -> (prompt turns, final assistant response)."""
  def bad(msg, reason="malformed_transcript"):
    return DataError(msg, file=file, row=row, field="text", reason=reason)
  if not value.startswith(_SYSTEM):
    raise bad(f"does not start with {_SYSTEM!r}")
  system, sep, rest = value[len(_SYSTEM):].partition(_TURN_SEP)
  if not sep:
    raise bad("no '<extra_id_1>' turn")
  turns = []
  if system.strip():
    turns.append({"role": "system", "content": system.strip()})
  segments = rest.split(_TURN_SEP)
  for i, segment in enumerate(segments):
    role, _, content = segment.partition("\n")
    if role not in ("User", "Assistant"):
      raise bad(f"turn {i + 1} has role {role!r} (expected User or Assistant)", "unknown_role")
    turns.append({"role": role.lower(), "content": content})
  last = turns.pop()
  if last["role"] != "assistant":
    raise bad("the last turn is not an Assistant turn")
  end = last["content"].find(_END)
  if end < 0:
    raise bad(f"the response does not end with {_END!r}")
  for turn in turns:
    turn["content"] = turn["content"].strip()
  return turns, last["content"][:end].strip()


def parse_steerlm(obj: dict, *, file: str, row: int) -> Scored:
  value = text(obj, "text", file=file, row=row, strip=False)
  prompt, response = split_steerlm_text(value, file=file, row=row)
  label = get(obj, "label", file=file, row=row)
  if not isinstance(label, list):
    raise DataError(f"expected a list of {len(STEERLM_LABELS)} numbers, got "
                    f"{type(label).__name__}", file=file, row=row, field="label",
                    reason="wrong_type")
  if len(label) != len(STEERLM_LABELS):
    raise DataError(f"{len(label)} values, expected {len(STEERLM_LABELS)} ({', '.join(STEERLM_LABELS)})",
                    file=file, row=row, field="label", reason="wrong_num_objectives")
  values = [number(x, f"label[{i}]", file=file, row=row, na=(NOT_ANNOTATED,))
            for i, x in enumerate(label)]
  kept = values[len(STEERLM_LABELS) - len(OBJECTIVES):]
  return Scored(key=json.dumps(prompt), prompt=prompt, response=response,
                scores=[0.0 if v is None else v for v in kept],
                mask=[0.0 if v is None else 1.0 for v in kept], file=file, row=row)


def read_split(paths: Sequence[str], split: str, config, policy: RowPolicy) -> Iterator[dict]:
  del split
  parse = parse_hf if config.name == "hf" else parse_steerlm
  yield from group_scored(paths, parse, policy, source=f"helpsteer2/{config.name}",
                          objectives=OBJECTIVES, make_pair=pair_by(0))


class Helpsteer2(PreferenceBuilder):
  """HelpSteer2 (HF columns or NeMo SteerLM jsonl), grouped by prompt (see the module doc)."""

  name = "helpsteer2"
  DESCRIPTION = "NVIDIA HelpSteer2: 0-4 ratings on 5 attributes, responses grouped by prompt."
  HOMEPAGE = "https://huggingface.co/datasets/nvidia/HelpSteer2"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("hf: put train.jsonl.gz / validation.jsonl.gz from "
                                  "nvidia/HelpSteer2 into manual_dir; steerlm: NeMo-Aligner "
                                  "regression-RM jsonl files {train,val,test}*.jsonl.")
  BUILDER_CONFIGS = [
      PreferenceConfig(name="hf", description="HF release columns",
                       files={"train": ["train.jsonl.gz", "train.jsonl"],
                              "validation": ["validation.jsonl.gz", "validation.jsonl"]}),
      PreferenceConfig(name="steerlm", description="NeMo-Aligner SteerLM regression RM jsonl",
                       files={"train": ["train*.jsonl"], "validation": ["val*.jsonl"],
                              "test": ["test*.jsonl"]}),
  ]
  read_split = staticmethod(read_split)
