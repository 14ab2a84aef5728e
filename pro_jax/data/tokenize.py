"""Prompt / response tokenization with `transformers` tokenizers, and the truncation policy.

Templates (``template=`` "auto" | "chat" | "plain"; "auto" = "chat" when the tokenizer has a chat
template, else "plain"):

* chat: ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``,
  tokenized with ``add_special_tokens=False`` (the template writes its own BOS); the response text is
  appended directly after the generation prompt.
* plain: ``[system content]`` + ``"\\n\\nHuman: {user}"`` / ``"\\n\\nAssistant: {assistant}"`` per turn +
  ``"\\n\\nAssistant:"``, tokenized with the tokenizer's own leading special tokens (its BOS, if it
  adds one); the response is appended as ``" " + response``.

Response tokens are those of ``prompt_text + separator + response`` after the prompt's tokens (so
BPE merges see the real context), or the response tokenized alone when the prompt's tokens are not a
prefix of the joint tokenization. Every response ends with ``tokenizer.eos_token_id``.

Truncation policy: the PROMPT is cut from the LEFT to ``max_prompt_len`` tokens (the most recent
turns / tokens are kept; a leading BOS is kept as the first token); the RESPONSE is never cut. A
response longer than ``max_response_len`` tokens (EOS included) is over-long: the input pipeline
raises a DataError (strict) or drops the row and counts it (lenient).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pro_jax.data.errors import DataError

PLAIN_USER = "\n\nHuman: "
PLAIN_ASSISTANT = "\n\nAssistant: "
PLAIN_GENERATION_PROMPT = "\n\nAssistant:"
PLAIN_RESPONSE_SEPARATOR = " "
TEMPLATES = ("auto", "chat", "plain")


def _text(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return _text(x.item())
  return str(x)


def normalize_messages(prompt: Any, *, file: str | None = None,
                       row: int | None = None) -> list[dict[str, str]]:
  """A prompt as a list of {"role", "content"} str dicts.

  Accepts the schema's list of dicts, a tfds-style dict of parallel arrays ({"role": [...],
  "content": [...]}), bytes / numpy strings, and a bare string (one user turn).
  """
  if isinstance(prompt, (str, bytes)):
    return [{"role": "user", "content": _text(prompt)}]
  if isinstance(prompt, Mapping):
    roles, contents = prompt.get("role"), prompt.get("content")
    if roles is None or contents is None or len(roles) != len(contents):
      raise DataError("expected a list of {role, content} messages", file=file, row=row, field="prompt")
    return [{"role": _text(r), "content": _text(c)} for r, c in zip(roles, contents)]
  try:
    return [{"role": _text(m["role"]), "content": _text(m["content"])} for m in prompt]
  except (TypeError, KeyError) as e:
    raise DataError(f"expected a list of {{role, content}} messages ({e})", file=file, row=row,
                    field="prompt") from None


def resolve_template(tokenizer: Any, template: str = "auto") -> str:
  """"chat" or "plain" for this tokenizer (``template`` "auto" picks chat when it has one)."""
  if template not in TEMPLATES:
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
  has_chat = bool(getattr(tokenizer, "chat_template", None))
  if template == "auto":
    return "chat" if has_chat else "plain"
  if template == "chat" and not has_chat:
    raise ValueError("template='chat' but the tokenizer has no chat template")
  return template


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str) -> str:
  """The prompt text ending where the assistant's response begins (template "chat" or "plain")."""
  if template == "chat":
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
  parts = []
  for m in messages:
    role, content = m["role"], m["content"]
    if role == "system":
      parts.append(content)
    elif role == "user":
      parts.append(PLAIN_USER + content)
    elif role == "assistant":
      parts.append(PLAIN_ASSISTANT + content)
    else:
      raise ValueError(f"unknown role {role!r}")
  return "".join(parts) + PLAIN_GENERATION_PROMPT


@functools.lru_cache(maxsize=16)
def _leading_specials_cached(tokenizer: Any) -> tuple[int, ...]:
  with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
  without = tokenizer("a", add_special_tokens=False)["input_ids"]
  for i in range(len(with_sp)):
    if with_sp[i:i + len(without)] == without:
      return tuple(with_sp[:i])
  return ()


def leading_special_tokens(tokenizer: Any) -> tuple[int, ...]:
  """Ids the tokenizer puts before text with add_special_tokens=True (its BOS, if any)."""
  try:
    return _leading_specials_cached(tokenizer)
  except TypeError:  # unhashable tokenizer object
    return _leading_specials_cached.__wrapped__(tokenizer)


def eos_id(tokenizer: Any) -> int:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
  return int(eos)


def decode_responses(tokenizer: Any, tokens_BxN: np.ndarray, mask_BxN: np.ndarray, eos: int) -> list[str]:
  """Response texts of generated tokens [B, N]: the masked-in tokens without EOS, special tokens
  skipped, stripped (as `generate`'s output is read by PPO's rollouts and by evaluation)."""
  ids = [[int(t) for t, m in zip(row, mrow) if m and t != eos] for row, mrow in zip(tokens_BxN, mask_BxN)]
  return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def pad_id(tokenizer: Any) -> int:
  """The tokenizer's pad id, else its EOS id (padding positions are always masked out)."""
  pad = getattr(tokenizer, "pad_token_id", None)
  return int(pad) if pad is not None else eos_id(tokenizer)


def encode(tokenizer: Any, prompts: Sequence[Sequence[Mapping[str, str]]],
           responses: Sequence[str | None] | None = None,
           template: str = "auto") -> tuple[list[list[int]], list[list[int]] | None]:
  """Tokenize prompts (and, optionally, one response per prompt) with the chosen template.

  Returns (prompt_ids, response_ids): untruncated lists of ids; each response ends with EOS (a None
  response gives None). Batched over the fast tokenizer. (The pipeline calls it once per source.)
  """
  template = resolve_template(tokenizer, template)
  # The same prompt object listed several times (a pair's two sides, N scored responses) is
  # rendered and tokenized once.
  first: dict[int, int] = {}
  unique = [first.setdefault(id(m), len(first)) for m in prompts]
  objs = {u: m for u, m in zip(unique, prompts)}
  u_texts = [render_prompt(tokenizer, objs[u], template) for u in range(len(objs))]
  lead = list(leading_special_tokens(tokenizer)) if template == "plain" else []
  u_ids = [lead + ids for ids in tokenizer(u_texts, add_special_tokens=False)["input_ids"]] if u_texts else []
  texts = [u_texts[u] for u in unique]
  p_ids = [list(u_ids[u]) for u in unique]
  if responses is None:
    return p_ids, None
  if len(responses) != len(prompts):
    raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
  sep = PLAIN_RESPONSE_SEPARATOR if template == "plain" else ""
  eos = eos_id(tokenizer)
  which = [i for i, r in enumerate(responses) if r is not None]
  r_ids: list[list[int] | None] = [None] * len(responses)
  if which:
    joint = tokenizer([texts[i] + sep + responses[i] for i in which], add_special_tokens=False)["input_ids"]
    alone = None
    for j, i in enumerate(which):
      p = p_ids[i][len(lead):]
      if joint[j][:len(p)] == p:
        r_ids[i] = list(joint[j][len(p):]) + [eos]
      else:  # the boundary merged: tokenize the response on its own
        if alone is None:
          alone = dict(zip(which, tokenizer([responses[k] for k in which],
                                            add_special_tokens=False)["input_ids"]))
        r_ids[i] = list(alone[i]) + [eos]
  return p_ids, r_ids


def truncate_prompt(ids: Sequence[int], max_len: int, bos_id: int | None = None) -> list[int]:
  """Keep the LAST ``max_len`` tokens of a prompt; a leading ``bos_id`` stays the first token."""
  ids = list(ids)
  if max_len < 1:
    raise ValueError(f"max_prompt_len must be >= 1, got {max_len}")
  if len(ids) <= max_len:
    return ids
  if bos_id is not None and ids and ids[0] == bos_id and max_len >= 2:
    return [bos_id] + ids[len(ids) - (max_len - 1):]
  return ids[len(ids) - max_len:]


def make_count_tokens(tokenizer: Any, template: str = "auto"):
  """``count_tokens(prompt_turns, response) -> int`` for ``pro_jax.data.validate``'s length hook.

  The untruncated length of the prompt as this module renders it plus the response with its EOS.
  (The pipeline itself truncates prompts and only checks the response against max_response_len.)
  """
  template = resolve_template(tokenizer, template)

  def count_tokens(prompt_turns: Any, response: str) -> int:
    p_ids, r_ids = encode(tokenizer, [normalize_messages(prompt_turns)], [response], template)
    return len(p_ids[0]) + len(r_ids[0])

  return count_tokens
