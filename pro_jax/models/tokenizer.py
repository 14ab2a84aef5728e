"""Tokenizers, all from `transformers` (version 5): a local checkpoint directory or a SentencePiece `.model`.

* `load_tokenizer(dir)`: `AutoTokenizer.from_pretrained(dir, local_files_only=True)`; a Hub id
  ``ORG/NAME[@REV]`` is first fetched into the Hub cache by `pro_jax.models.hub.resolve_pretrained`.
* `load_tokenizer("x.model")`: a SentencePiece BPE model (Llama 2 / llama2.c style, byte fallback) as a
  `transformers.LlamaTokenizer`: BOS prepended, no EOS, SentencePiece's dummy-prefix space, decoding
  that strips the leading space after BOS (as llama2.c does). transformers 5 silently builds a
  3-token tokenizer from `LlamaTokenizer(vocab_file=...)`; this goes through
  `convert_to_native_format` instead and checks the vocabulary size.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from pro_jax.data import files
from pro_jax.models.gguf import gguf_tokenizer
from pro_jax.models.hub import TOKENIZER_PATTERNS, resolve_pretrained

PathLike = str | os.PathLike

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class TokenizerError(ValueError):
  """A tokenizer file or directory that cannot be loaded; the message names it."""


def _sentencepiece_model(path: pathlib.Path) -> Any:
  """The parsed SentencePiece ModelProto (via transformers' protobuf copy)."""
  try:
    from transformers.convert_slow_tokenizer import import_protobuf
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
  except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError / others
    raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
  if not proto.pieces:
    raise TokenizerError(f"{path}: SentencePiece model has no pieces")
  return proto


def load_sentencepiece_tokenizer(path: PathLike, *, add_bos_token: bool = True, add_eos_token: bool = False,
                                 **kwargs) -> Any:
  """A SentencePiece BPE `.model` file as a `transformers.LlamaTokenizer` (see module docstring)."""
  from transformers import LlamaTokenizer

  path = pathlib.Path(path)
  if not path.is_file():
    raise TokenizerError(f"{path}: no such SentencePiece model file")
  proto = _sentencepiece_model(path)
  if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 BPE, 3 word, 4 char
    raise TokenizerError(f"{path}: SentencePiece model_type {proto.trainer_spec.model_type} is not BPE; only "
                         "BPE models (Llama / llama2.c style) are supported from a .model file")
  pieces = [p.piece for p in proto.pieces]

  def special(idx: int, default: str) -> str:
    return pieces[idx] if 0 <= idx < len(pieces) else default

  ts = proto.trainer_spec
  kwargs.setdefault("add_prefix_space", bool(proto.normalizer_spec.add_dummy_prefix))
  native = LlamaTokenizer.convert_to_native_format(
      vocab_file=str(path), legacy=False, add_bos_token=add_bos_token, add_eos_token=add_eos_token,
      unk_token=special(ts.unk_id, "<unk>"), bos_token=special(ts.bos_id, "<s>"),
      eos_token=special(ts.eos_id, "</s>"), **kwargs)
  tok = LlamaTokenizer(**native)
  if len(tok) != len(pieces):
    raise TokenizerError(f"{path}: converted tokenizer has {len(tok)} tokens, the model has {len(pieces)}")
  return tok


def load_tokenizer(path: PathLike, *, revision: str | None = None, cache_dir: PathLike | None = None,
                   **kwargs) -> Any:
  """A transformers tokenizer from a checkpoint directory (local or gs://: a remote one is downloaded to a
  local temp folder first, see `pro_jax.data.files`), a SentencePiece `.model` file, a `.gguf` file (its
  own tokenizer and chat template), or a Hugging Face Hub id ``ORG/NAME[@REVISION]`` (only the tokenizer
  files are fetched, through `pro_jax.models.hub.resolve_pretrained`; then read with local_files_only)."""
  if files.is_remote(path):
    path = files.local_copy(path)
  path = resolve_pretrained(path, revision=revision, cache_dir=cache_dir, allow_patterns=TOKENIZER_PATTERNS)
  if path.is_dir():
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
      raise TokenizerError(f"{path}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer
    try:
      return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
      raise TokenizerError(f"{path}: AutoTokenizer could not load it ({type(e).__name__}: {e})") from e
  if path.suffix == ".model":
    return load_sentencepiece_tokenizer(path, **kwargs)
  if path.suffix == ".gguf" and path.is_file():
    return gguf_tokenizer(path)  # the tokenizer and chat template stored in the GGUF file
  if not path.exists():
    raise TokenizerError(f"{path}: no such file or directory")
  raise TokenizerError(f"{path}: expected a tokenizer directory, a SentencePiece .model or a .gguf file")
