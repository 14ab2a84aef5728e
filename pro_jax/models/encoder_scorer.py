"""An encoder sequence classifier (DistilBERT / BART, `pro_jax.models.encoders`) as a reward scorer.

The paper's two non-decoder scorers are called the way RiC (whose setup the paper follows) calls them:

* humor (`mohameddhiab/humor-no-humor`, labels NO_HUMOR / HUMOR): the response alone,
  ``tokenizer(response)``, reward = the logit of label 1 (HUMOR);
* faithfulness (`CogComp/bart-faithful-summary-detector`, labels Hallucinated / Faithful): the summary
  first, then the document, ``tokenizer(text=summary, text_pair=post)``, reward = the logit of label 1
  (Faithful). The document is the post of the TL;DR prompt (`tldr_post`).

    humor = encoder_reward_scorer("models/humor-no-humor", "humor", preset="humor")
    scores_Nx1 = humor.score(prompts, responses)            # the Scorer interface: [N, K=1]

Anything else is a choice of `label` (an index or an id2label name), `text` ("response",
"response_prompt" = text then pair, "prompt_response") and `output` ("logit", "prob", "log_prob").
Inputs are truncated like transformers' ``truncation=True`` (longest first for pairs) to `max_len`
(default min(tokenizer.model_max_length, the model's positions, 1024), RiC's limit), padded on the
right to a multiple of 64 and scored in jitted fixed-size batches (a few compiled shapes at most).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from pro_jax.models.encoders import EncoderClassifier, EncoderConfig, load_encoder_classifier
from pro_jax.models.inference import params_fingerprint
from pro_jax.models.tokenizer import load_tokenizer

TEXT_MODES = ("response", "response_prompt", "prompt_response")
OUTPUTS = ("logit", "prob", "log_prob")
_BUCKET = 64


def last_user_text(prompt: Any) -> str:
  """The text of a prompt: a plain string, or the last user turn of a list of {role, content}."""
  if isinstance(prompt, (str, bytes)):
    return prompt.decode() if isinstance(prompt, bytes) else prompt
  if isinstance(prompt, Mapping):  # tfds-style parallel arrays
    prompt = [{"role": r, "content": c} for r, c in zip(prompt["role"], prompt["content"])]
  turns = [m for m in prompt if str(m["role"]) == "user"] or list(prompt)
  if not turns:
    raise ValueError("empty prompt: no turns")
  content = turns[-1]["content"]
  return content.decode() if isinstance(content, bytes) else str(content)


_TLDR = re.compile(r"POST:\s*(.*?)\s*(?:\n\s*)*TL;DR:\s*$", re.S)


def tldr_post(prompt: Any) -> str:
  """The post of a TL;DR query ("SUBREDDIT: ...\\n\\nTITLE: ...\\n\\nPOST: {post}\\n\\nTL;DR:", the
  summarize_from_feedback builder's prompt): the document a summary is faithful to. Other prompts:
  their last user turn, with a trailing "TL;DR:" removed."""
  text = last_user_text(prompt)
  m = _TLDR.search(text)
  if m:
    return m.group(1)
  return re.sub(r"\s*TL;DR:\s*$", "", text)


PROMPT_TEXT: dict[str, Callable[[Any], str]] = {"last_user": last_user_text, "tldr_post": tldr_post}

# RiC's calls of the paper's scorers (see the module docstring).
PRESETS: dict[str, dict[str, Any]] = {
    "humor": dict(label=1, text="response", output="logit"),
    "faithfulness": dict(label=1, text="response_prompt", prompt_text="tldr_post", output="logit"),
}


@functools.lru_cache(maxsize=32)
def _scores_fn(config: EncoderConfig, label: int, output: str) -> Callable:
  """(params, tokens_BxL, mask_BxL) -> [B] jitted; shared by scorers of one config (compiled once)."""
  model = EncoderClassifier(config)

  def scores(p, tokens_BxL, mask_BxL):
    logits_BxC = model.apply({"params": p}, tokens_BxL, mask_BxL).scores
    if output == "prob":
      return jax.nn.softmax(logits_BxC, axis=-1)[:, label]
    if output == "log_prob":
      return jax.nn.log_softmax(logits_BxC, axis=-1)[:, label]
    return logits_BxC[:, label]

  return jax.jit(scores)


class EncoderClassifierScorer:
  """One label of an encoder classifier as one objective: ``score(prompts, responses) -> [N, 1]``.

  Args:
    model, params: from `pro_jax.models.encoders.load_encoder_classifier` (or `load_hf_model`).
    tokenizer: the checkpoint's transformers tokenizer (WordPiece for DistilBERT, BPE for BART).
    objective: the objective's name.
    label: the score column, an index or an id2label name ("HUMOR", "Faithful").
    text: "response" (the response alone), "response_prompt" (response, then the prompt's text as
      the pair) or "prompt_response".
    prompt_text: how a prompt becomes text: "last_user", "tldr_post" or a callable.
    output: "logit" (the label's raw logit, as RiC), "prob" (its softmax probability) or "log_prob".
    batch_size: rows per jitted call (the last batch is padded).
    max_len: truncation length (default min(tokenizer.model_max_length, the model's positions, 1024)).
  """

  def __init__(self, model: EncoderClassifier, params: Any, tokenizer: Any, objective: str, *,
               label: int | str = 1, text: str = "response", prompt_text: str | Callable[[Any], str] = "last_user",
               output: str = "logit", batch_size: int = 32, max_len: int | None = None, name: str = "encoder"):
    cfg = model.config
    if text not in TEXT_MODES:
      raise ValueError(f"text must be one of {TEXT_MODES}, got {text!r}")
    if output not in OUTPUTS:
      raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if isinstance(prompt_text, str):
      if prompt_text not in PROMPT_TEXT:
        raise ValueError(f"prompt_text must be one of {sorted(PROMPT_TEXT)} or a callable, got {prompt_text!r}")
      prompt_text = PROMPT_TEXT[prompt_text]
    if getattr(tokenizer, "pad_token_id", None) is None:
      raise ValueError("the tokenizer has no pad token (needed to batch rows)")
    self.label = cfg.label_index(label)
    limit = min(int(getattr(tokenizer, "model_max_length", 1024) or 1024), cfg.max_seq_len, 1024)
    self.max_len = limit if max_len is None else int(max_len)
    if not 0 < self.max_len <= cfg.max_seq_len:
      raise ValueError(f"max_len={self.max_len} must be in [1, {cfg.max_seq_len}] (the model's learned positions)")
    self.model, self.tokenizer, self.params = model, tokenizer, params
    self.objectives = (objective,)
    self.text, self.prompt_text, self.output = text, prompt_text, output
    self.batch_size, self.name = int(batch_size), name
    self._fn = _scores_fn(cfg, self.label, output)
    self._fingerprint: str | None = None

  @property
  def key(self) -> str:
    """Identifies this scorer in a disk cache (settings, tokenizer and a fingerprint of the weights)."""
    if self._fingerprint is None:
      self._fingerprint = params_fingerprint(self.params)
    tok = [type(self.tokenizer).__name__, len(self.tokenizer), getattr(self.tokenizer, "name_or_path", "")]
    return json.dumps([self.name, self.objectives, self.label, self.text, getattr(self.prompt_text, "__name__", "fn"),
                       self.output, self.max_len, tok, self._fingerprint])

  def texts(self, prompts: Sequence[Any], responses: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(text, text_pair or None) as passed to the tokenizer."""
    responses = [str(r) for r in responses]
    if self.text == "response":
      return responses, None
    docs = [self.prompt_text(p) for p in prompts]
    return (responses, docs) if self.text == "response_prompt" else (docs, responses)

  def tokenize(self, prompts: Sequence[Any], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (tokens [N, L], mask [N, L]), L = the longest row rounded up to a multiple of 64
    (at most max_len)."""
    text, pair = self.texts(prompts, responses)
    if not text:
      return np.zeros((0, 1), np.int32), np.zeros((0, 1), np.int32)
    ids = self.tokenizer(text, pair, truncation=True, max_length=self.max_len)["input_ids"]
    longest = max(len(r) for r in ids)
    L = min(-(-longest // _BUCKET) * _BUCKET, self.max_len)
    tokens = np.full((len(ids), L), self.tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(ids), L), np.int32)
    for i, r in enumerate(ids):
      tokens[i, :len(r)] = r
      mask[i, :len(r)] = 1
    return tokens, mask

  def score_tokens(self, tokens_NxL: np.ndarray, mask_NxL: np.ndarray) -> np.ndarray:
    """[N] scores of right-padded rows (fixed-size batches, the last one padded by repeating a row)."""
    n, B = len(tokens_NxL), self.batch_size
    out = np.zeros((n,), np.float32)
    for start in range(0, n, B):
      stop = min(start + B, n)
      tokens, mask = tokens_NxL[start:stop], mask_NxL[start:stop]
      if stop - start < B:
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], B - (stop - start), 0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], B - (stop - start), 0)])
      out[start:stop] = np.asarray(self._fn(self.params, tokens, mask))[:stop - start]
    return out

  def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    """float32 [N, 1]: the objective's score of each (prompt, response)."""
    n = len(responses)
    if len(prompts) != n:
      raise ValueError(f"got {len(prompts)} prompts and {n} responses")
    out = np.zeros((n, 1), np.float32)
    chunk = self.batch_size * 16  # tokenize in chunks (bounded host memory; one length bucket per chunk)
    for start in range(0, n, chunk):
      stop = min(start + chunk, n)
      tokens, mask = self.tokenize(prompts[start:stop], responses[start:stop])
      out[start:stop, 0] = self.score_tokens(tokens, mask)
    return out


def encoder_reward_scorer(directory: str | os.PathLike, objective: str, *, preset: str | None = None,
                          label: int | str | None = None, text: str | None = None,
                          prompt_text: str | Callable[[Any], str] | None = None, output: str | None = None,
                          tokenizer: Any = None, dtype: str = "float32", batch_size: int = 32,
                          max_len: int | None = None, mesh: Any = None, name: str | None = None
                          ) -> EncoderClassifierScorer:
  """A DistilBERT / BART sequence-classifier directory as a scorer of one objective.

  preset: "humor" or "faithfulness" (RiC's calls, `PRESETS`); explicit arguments override it. Without
  a preset: label 1, the response alone, the raw logit. tokenizer: default the directory's own
  (`pro_jax.models.tokenizer.load_tokenizer`).
  """
  if preset is not None and preset not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
  settings = {**dict(label=1, text="response", prompt_text="last_user", output="logit"), **PRESETS.get(preset, {})}
  for k, v in dict(label=label, text=text, prompt_text=prompt_text, output=output).items():
    if v is not None:
      settings[k] = v
  model, params = load_encoder_classifier(directory, dtype=dtype, param_dtype=dtype, mesh=mesh)
  if tokenizer is None:
    tokenizer = load_tokenizer(directory)
  return EncoderClassifierScorer(model, params, tokenizer, objective, batch_size=batch_size, max_len=max_len,
                                 name=name or f"hf:{os.path.abspath(os.fspath(directory))}", **settings)


__all__ = ["EncoderClassifierScorer", "PRESETS", "encoder_reward_scorer", "last_user_text", "tldr_post"]
