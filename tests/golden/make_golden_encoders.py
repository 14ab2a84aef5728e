"""Golden fixtures for the encoder classifiers (DistilBERT, BART): tiny random PyTorch `transformers`
models, tiny trained tokenizers, and their fp32 scores.

NOT part of the test suite and NOT a dependency of pro_jax: it needs torch + transformers, which live in
a separate virtual environment (see tests/golden/make_golden.py for the setup). From the repository root:

    /tmp/torchvenv/bin/python tests/golden/make_golden_encoders.py   # rewrites fixtures/{distilbert,bart}_*

Each fixture directory holds what `save_pretrained(safe_serialization=True)` wrote for the model and
(for the fixtures named `*_tok`) its tokenizer, plus `golden.npz`:
  tokens [B, L] int32, mask [B, L] int32 (rows: full, right-padded, left-padded, right-padded; pad =
  pad_token_id, never a real token; BART rows hold one EOS: the last real token, except in the fourth
  row, where three real tokens follow it), scores [B, num_labels] float32
  from the eager fp32 torch forward (`model(input_ids, attention_mask).logits`).
Fixtures with a tokenizer also hold `texts.json` (prompts, responses) and in golden.npz the reference
of the paper's scoring calls (as RiC makes them):
  DistilBERT (humor): `tokenizer(responses, padding=True, truncation=True, max_length=M)` ->
    text_tokens / text_mask / text_scores;
  BART (faithfulness): `tokenizer(text=responses, text_pair=posts, ...)` (summary first, then the
    document) -> the same keys.
All weights (LayerNorm scales and biases included) are re-drawn at a scale giving scores of
magnitude 1-5, so a wrong mapping cannot hide behind a near-zero output.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BartConfig, BartForSequenceClassification, BartTokenizer, DistilBertConfig,
                          DistilBertForSequenceClassification, DistilBertTokenizer)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
MAX_TEXT_LEN = {False: 48, True: 96}  # DistilBERT, BART

CORPUS = [
    "Why did the scarecrow win an award? Because he was outstanding in his field.",
    "I told my wife she was drawing her eyebrows too high. She looked surprised.",
    "The meeting is scheduled for nine in the morning on Tuesday.",
    "Please submit the quarterly report before the end of the week.",
    "My landlord raised the rent again, so I moved into the car. It has great mileage.",
    "I asked the librarian for books about paranoia. She whispered: they are right behind you.",
    "The cat sat on the mat and looked at the rain for an hour.",
    "TIFU by locking myself out of my apartment while the oven was on.",
    "My roommate keeps eating my food and denies it every single time.",
    "We adopted a dog last month and he already rules the house.",
    "Summary: the author locked herself out and the fire department helped.",
    "How do I tell my boss that I need a day off without sounding lazy?",
    "Parallel lines have so much in common. It is a shame they will never meet.",
    "I would tell you a joke about construction, but I am still working on it.",
]

PROMPTS = [
    "Tell me something about cats.",
    "SUBREDDIT: r/tifu\n\nTITLE: locked out\n\nPOST: I locked myself out of my apartment while the oven was on."
    " The fire department came and let me in.\n\nTL;DR:",
    "What should I do about my roommate?",
    "SUBREDDIT: r/dogs\n\nTITLE: new dog\n\nPOST: We adopted a dog last month and he rules the house now.\n\nTL;DR:",
]
RESPONSES = [
    "Why did the cat sit on the computer? To keep an eye on the mouse!",
    "locked out of my apartment, the fire department helped",
    "Talk to your roommate calmly and label your food.",
    "our new dog rules the house",
]


def wordpiece_tokenizer(out_dir: pathlib.Path) -> DistilBertTokenizer:
  """A WordPiece tokenizer (BERT normalization, lower case) trained on CORPUS, saved as vocab.txt."""
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(vocab_size=220, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  tok.train_from_iterator(CORPUS + RESPONSES + PROMPTS, trainer)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  hf = DistilBertTokenizer(vocab=dict(vocab), do_lower_case=True, model_max_length=64)
  assert len(hf) == len(vocab), (len(hf), len(vocab))
  hf.save_pretrained(out_dir)
  return hf


def bpe_tokenizer(out_dir: pathlib.Path) -> BartTokenizer:
  """A byte-level BPE tokenizer (GPT-2 / BART style) trained on CORPUS, saved as vocab.json + merges.txt."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  special = ["<s>", "<pad>", "</s>", "<unk>"]
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS + RESPONSES + PROMPTS, trainer)
  with tempfile.TemporaryDirectory() as tmp:
    tok.model.save(tmp)
    vocab = json.loads((pathlib.Path(tmp) / "vocab.json").read_text())
    vocab["<mask>"] = len(vocab)
    (pathlib.Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
    hf = BartTokenizer(vocab=str(pathlib.Path(tmp) / "vocab.json"), merges=str(pathlib.Path(tmp) / "merges.txt"),
                       model_max_length=128)
  hf.save_pretrained(out_dir)
  return hf


# name -> (model class, config class, config kwargs, tokenizer builder or None)
SPECS = {
    "distilbert_cls2_tok": (DistilBertForSequenceClassification, DistilBertConfig, dict(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, activation="gelu",
        id2label={0: "NO_HUMOR", 1: "HUMOR"}, label2id={"NO_HUMOR": 0, "HUMOR": 1}), wordpiece_tokenizer),
    "distilbert_cls3_relu": (DistilBertForSequenceClassification, DistilBertConfig, dict(
        vocab_size=96, dim=24, n_layers=3, n_heads=2, hidden_dim=40, max_position_embeddings=32, activation="relu",
        num_labels=3), None),
    "bart_cls2_tok": (BartForSequenceClassification, BartConfig, dict(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, activation_function="gelu",
        scale_embedding=False, id2label={0: "Hallucinated", 1: "Faithful"},
        label2id={"Hallucinated": 0, "Faithful": 1}), bpe_tokenizer),
    "bart_cls3_scaled": (BartForSequenceClassification, BartConfig, dict(
        vocab_size=80, d_model=24, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=3, encoder_ffn_dim=40, decoder_ffn_dim=56, max_position_embeddings=32,
        activation_function="gelu", scale_embedding=True, num_labels=3), None),
}


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Re-draw every parameter: Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.5^2), LayerNorm
  scales ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.1^2). Tied weights are drawn once (named_parameters dedups)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      lower = name.lower()
      if "norm" in lower and name.endswith("weight"):
        val = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
      elif name.endswith("bias"):
        val = 0.1 * torch.randn(p.shape, generator=gen)
      elif "embed" in lower or "shared" in lower:
        val = 0.5 * torch.randn(p.shape, generator=gen)
      else:  # nn.Linear [out, in]; the last layer of the head x3 (scores of magnitude 1-5)
        last = name.startswith("classifier.") or name.startswith("classification_head.out_proj")
        val = (3.0 if last else 1.0) * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
      p.copy_(val)


def make_inputs(seq_len: int, vocab: int, pad: int, eos: int | None, reserved: set[int], rng: np.random.Generator):
  """tokens / mask [4, L]: a full row, a right-padded row, a left-padded row and a right-padded row.
  Real tokens avoid `reserved` (pad, eos, ...); with `eos`, each row holds one EOS (BART's head reads
  it): the last real token of rows 0-2, followed by three more real tokens in row 3."""
  allowed = np.array([t for t in range(vocab) if t not in reserved])
  tokens = rng.choice(allowed, size=(4, seq_len)).astype(np.int32)
  mask = np.ones((4, seq_len), np.int32)
  mask[1, seq_len - 3:] = 0
  mask[2, :2] = 0
  mask[3, seq_len - 2:] = 0
  if eos is not None:
    at = np.array([seq_len - 1, seq_len - 4, seq_len - 1, seq_len - 6])
    tokens[np.arange(4), at] = eos
  return np.where(mask == 1, tokens, pad).astype(np.int32), mask


def torch_scores(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long())
  return out.logits.float().numpy()


def build(name: str) -> None:
  cls, cfg_cls, cfg_kw, make_tok = SPECS[name]
  seed = sorted(SPECS).index(name)
  out_dir = FIXTURES / name
  if out_dir.exists():
    shutil.rmtree(out_dir)
  out_dir.mkdir(parents=True)
  tok = make_tok(out_dir) if make_tok is not None else None
  kw = dict(cfg_kw)
  is_bart = cfg_cls is BartConfig
  if tok is not None:
    kw["vocab_size"] = len(tok)
    kw["pad_token_id"] = tok.pad_token_id
    if is_bart:
      kw.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id)
  torch.manual_seed(seed)
  cfg = cfg_cls(**kw)
  model = cls(cfg).eval()
  model.set_attn_implementation("eager")
  randomize_(model, torch.Generator().manual_seed(2000 + seed))
  pad = cfg.pad_token_id
  eos = cfg.eos_token_id if is_bart else None
  reserved = {pad} | ({cfg.eos_token_id, cfg.bos_token_id} if is_bart else set())
  if tok is not None:
    reserved |= set(tok.all_special_ids)
  tokens, mask = make_inputs(12, cfg.vocab_size, pad, eos, reserved, np.random.default_rng(seed))
  arrays = dict(tokens=tokens, mask=mask, scores=torch_scores(model, tokens, mask).astype(np.float32))
  if tok is not None:
    if is_bart:  # RiC's faithfulness call: the summary first, then the post
      posts = [p.split("POST: ")[-1].split("\n\nTL;DR:")[0] for p in PROMPTS]
      enc = tok(text=RESPONSES, text_pair=posts, padding=True, truncation=True, max_length=MAX_TEXT_LEN[True],
                return_tensors="np")
    else:  # RiC's humor call: the response only
      enc = tok(RESPONSES, padding=True, truncation=True, max_length=MAX_TEXT_LEN[False], return_tensors="np")
    t, m = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    arrays.update(text_tokens=t, text_mask=m, text_scores=torch_scores(model, t, m).astype(np.float32))
    (out_dir / "texts.json").write_text(json.dumps({"prompts": PROMPTS, "responses": RESPONSES,
                                                    "max_length": MAX_TEXT_LEN[is_bart]}, indent=1) + "\n")
  model.save_pretrained(out_dir, safe_serialization=True)
  np.savez(out_dir / "golden.npz", **arrays)
  size = sum(f.stat().st_size for f in out_dir.iterdir())
  text = f"  text |scores| {np.abs(arrays['text_scores']).max():6.3f}" if "text_scores" in arrays else ""
  print(f"{name:22s} {cls.__name__:38s} max|scores| {np.abs(arrays['scores']).max():6.3f}{text}  "
        f"{size / 1024:6.1f} KiB")


# Full-size shapes (distilbert-base-uncased, bart-base) for a manual check, not committed:
#   python tests/golden/make_golden_encoders.py --full-size DIR   # writes DIR/<name>/ (~0.8 GB in all)
FULL_SIZE = {
    "distilbert_base": (DistilBertForSequenceClassification, DistilBertConfig(num_labels=2)),
    "bart_base": (BartForSequenceClassification, BartConfig(
        d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
        encoder_ffn_dim=3072, decoder_ffn_dim=3072, num_labels=2)),
}


def build_full_size(root: pathlib.Path, seq_len: int = 128) -> None:
  """Random models of the real scorers' shapes, re-drawn like the fixtures, and their fp32 scores on
  padded rows of `seq_len` tokens, for `pro_jax` to be compared against (not part of the suite)."""
  for i, (name, (cls, cfg)) in enumerate(FULL_SIZE.items()):
    torch.manual_seed(i)
    model = cls(cfg).eval()
    model.set_attn_implementation("eager")
    randomize_(model, torch.Generator().manual_seed(3000 + i))
    is_bart = isinstance(cfg, BartConfig)
    reserved = {cfg.pad_token_id} | ({cfg.eos_token_id, cfg.bos_token_id} if is_bart else set())
    tokens, mask = make_inputs(seq_len, cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id if is_bart else None,
                               reserved, np.random.default_rng(i))
    out = root / name
    model.save_pretrained(out, safe_serialization=True)
    np.savez(out / "golden.npz", tokens=tokens, mask=mask, scores=torch_scores(model, tokens, mask))
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters -> {out}")


def main() -> None:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--full-size", type=pathlib.Path, default=None, help="write full-size random models here")
  args = parser.parse_args()
  torch.set_num_threads(1)
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  if args.full_size is not None:
    build_full_size(args.full_size)
    return
  for name in SPECS:
    build(name)


if __name__ == "__main__":
  main()
