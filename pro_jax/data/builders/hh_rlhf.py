"""Anthropic HH-RLHF (anthropics/hh-rlhf): pairs of "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts.

manual_dir layout (as in the GitHub repo / the HF dataset ``Anthropic/hh-rlhf``)::

  <manual_dir>/<config>/train.jsonl.gz
  <manual_dir>/<config>/test.jsonl.gz

with config one of helpful-base, harmless-base, helpful-online, helpful-rejection-sampled. Each
line is ``{"chosen": transcript, "rejected": transcript}``.

Splitting. chosen and rejected share the dialogue before the final assistant reply. The prompt
ends at the last ``"\\n\\nAssistant:"`` marker that lies inside the longest common prefix of the
two transcripts; everything after it is the reply (chosen / rejected). This is robust to real
rows whose final reply itself contains an ``"\\n\\nAssistant:"`` marker (a reply in several
messages; 14 such rows in the two test files here): splitting each transcript at its own last
marker would give the two sides different prompts. The replies keep such inner markers
verbatim. A reply that contains ``"\\n\\nHuman:"`` means the transcripts differ before the last
user turn: reason ``prefix_mismatch``. The prompt text is split at every ``"\\n\\nHuman:"`` /
``"\\n\\nAssistant:"`` marker into user / assistant turns; turn contents and replies are stripped
of surrounding whitespace. Consecutive turns of the same role (a few real rows) are kept as they
are. Rows with an empty reply or chosen == rejected fail validation (strict: error; lenient:
dropped and counted).

Objectives ``["helpful", "harmless"]``; a harmless-base pair speaks for "harmless"
(``pair_objectives = [0, 1]``), a helpful-* pair for "helpful" (``[1, 0]``). No scored responses.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Sequence

from pro_jax.data import schema
from pro_jax.data.builders.common import (PreferenceBuilder, PreferenceConfig, common_prefix_len,
                                          convert_rows, text)
from pro_jax.data.errors import DataError
from pro_jax.data.validate import RowPolicy

OBJECTIVES = ("helpful", "harmless")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
CONFIGS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")


def pair_objectives_for(config_name: str) -> list[float]:
  return [0.0, 1.0] if config_name.startswith("harmless") else [1.0, 0.0]


def split_turns(transcript: str, *, field: str = "chosen", file=None, row=None) -> list[dict]:
  """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` -> ``[{"role": "user", "content": "a"}, ...]``."""
  parts = _TURN_RE.split(transcript)
  if parts[0].strip():
    raise DataError(f"text before the first Human/Assistant marker: {parts[0][:60]!r}",
                    file=file, row=row, field=field, reason="malformed_transcript")
  return [{"role": _ROLES[role], "content": content.strip()}
          for role, content in zip(parts[1::2], parts[2::2])]


def split_pair(chosen: str, rejected: str, *, file=None, row=None) -> tuple[list[dict], str, str]:
  """(prompt turns, chosen reply, rejected reply) from two full transcripts (see module doc)."""
  for field, transcript in (("chosen", chosen), ("rejected", rejected)):
    if ASSISTANT not in transcript:
      raise DataError("no '\\n\\nAssistant:' turn in the transcript", file=file, row=row,
                      field=field, reason="malformed_transcript")
  k = common_prefix_len(chosen, rejected)
  cut = chosen.rfind(ASSISTANT, 0, k)
  if cut < 0:
    raise DataError("chosen and rejected share no dialogue before an '\\n\\nAssistant:' reply",
                    file=file, row=row, field="rejected", reason="prefix_mismatch")
  replies = chosen[cut + len(ASSISTANT):], rejected[cut + len(ASSISTANT):]
  for field, reply in zip(("chosen", "rejected"), replies):
    if HUMAN in reply:
      raise DataError("chosen and rejected differ before the last Human turn (the reply holds a "
                      "'\\n\\nHuman:' turn)", file=file, row=row, field=field,
                      reason="prefix_mismatch")
  prompt = split_turns(chosen[:cut], field="chosen", file=file, row=row)
  return prompt, replies[0].strip(), replies[1].strip()


def parse_row(obj: dict, *, file: str, row: int, config_name: str) -> dict:
  chosen = text(obj, "chosen", file=file, row=row, strip=False)
  rejected = text(obj, "rejected", file=file, row=row, strip=False)
  prompt, reply_c, reply_r = split_pair(chosen, rejected, file=file, row=row)
  return schema.make_example(
      id=f"{os.path.basename(file)}:{row}", source=f"hh_rlhf/{config_name}",
      objectives=OBJECTIVES, prompt=prompt, chosen=reply_c, rejected=reply_r,
      pair_objectives=pair_objectives_for(config_name))


def read_split(paths: Sequence[str], split: str, config, policy: RowPolicy) -> Iterator[dict]:
  del split
  name = config.name
  yield from convert_rows(
      paths, lambda obj, file, row: parse_row(obj, file=file, row=row, config_name=name), policy)


class HhRlhf(PreferenceBuilder):
  """Anthropic HH-RLHF pairs (see the module docstring for the layout and the splitting rule)."""

  name = "hh_rlhf"
  DESCRIPTION = "Anthropic HH-RLHF human preference pairs, split into dialogue prompt and reply."
  HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put <config>/{train,test}.jsonl.gz from "
                                  "https://github.com/anthropics/hh-rlhf into manual_dir.")
  BUILDER_CONFIGS = [
      PreferenceConfig(name=c, description=f"HH-RLHF {c}",
                       files={"train": [f"{c}/train.jsonl.gz"], "test": [f"{c}/test.jsonl.gz"]})
      for c in CONFIGS
  ]
  read_split = staticmethod(read_split)
