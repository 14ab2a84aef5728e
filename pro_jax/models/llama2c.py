"""llama2.c checkpoints (Karpathy's legacy "version 0" `.bin` format) as a pro_jax Llama model.

Format (little-endian): a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means the classifier is NOT shared with the embedding),
then float32 arrays, nn.Linear weights as [out, in]:
token_embedding [V, D]; rms_att [L, D]; wq [L, D, D]; wk [L, KVD, D]; wv [L, KVD, D]; wo [L, D, D];
rms_ffn [L, D]; w1 [L, H, D]; w2 [L, D, H]; w3 [L, H, D]; rms_final [D];
freq_cis_real [seq_len, hd/2]; freq_cis_imag [seq_len, hd/2] (skipped: RoPE is recomputed);
wcls [V, D] only when unshared. RMSNorm eps 1e-5, RoPE theta 10000.

llama2.c rotates interleaved pairs (x[2i], x[2i+1]); pro_jax (like HF) rotates halves
(x[i], x[i + hd/2]). The wq / wk rows are permuted exactly as transformers'
`convert_llama_weights_to_hf.permute` does, which makes the two computations identical.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np

from pro_jax.models.config import ModelConfig
from pro_jax.models.tokenizer import load_tokenizer
from pro_jax.models.transformer import Transformer, abstract_variables

PathLike = str | os.PathLike
_HEADER_BYTES = 7 * 4
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer export formats (version 1 / 2)


class Llama2cError(ValueError):
  """A file that is not a valid llama2.c version-0 checkpoint; the message names it."""


def permute_rotary(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Interleaved-pair RoPE rows -> half-rotation rows (transformers' convert_llama_weights_to_hf)."""
  out, inp = w_OxI.shape
  return w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def read_header(path: PathLike) -> dict[str, int]:
  """The 7-int header, validated against the file size."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise Llama2cError(f"{path}: no such llama2.c checkpoint file")
  size = path.stat().st_size
  if size < _HEADER_BYTES:
    raise Llama2cError(f"{path}: {size} bytes, too small for a llama2.c header ({_HEADER_BYTES} bytes)")
  with open(path, "rb") as f:
    raw = np.frombuffer(f.read(_HEADER_BYTES), dtype="<i4")
  if int(raw[0]) == _MAGIC_V1:
    raise Llama2cError(f"{path}: a llama2.c version-1/2 export (magic 'ak42'); only the legacy version-0 "
                       "format is supported (export with `--version 0`)")
  dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(x) for x in raw)
  h = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
           vocab_size=abs(vocab), seq_len=seq_len, shared_classifier=vocab > 0)
  bad = [k for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
         if h[k] <= 0]
  if bad or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
    fields = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    raise Llama2cError(f"{path}: invalid llama2.c header {dict(zip(fields, raw.tolist()))}")
  expected = _HEADER_BYTES + 4 * sum(int(np.prod(s)) for s in _layout(h).values())
  if size != expected:
    raise Llama2cError(f"{path}: {size} bytes, but its header {raw.tolist()} implies {expected} bytes "
                       "(truncated, a different format, or a different llama2.c version)")
  return h


def _layout(h: dict[str, int]) -> dict[str, tuple[int, ...]]:
  D, H, L, V = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
  hd = D // h["n_heads"]
  kvd = hd * h["n_kv_heads"]
  layout = {"token_embedding": (V, D), "rms_att": (L, D), "wq": (L, D, D), "wk": (L, kvd, D), "wv": (L, kvd, D),
            "wo": (L, D, D), "rms_ffn": (L, D), "w1": (L, H, D), "w2": (L, D, H), "w3": (L, H, D),
            "rms_final": (D,), "freq_cis_real": (h["seq_len"], hd // 2), "freq_cis_imag": (h["seq_len"], hd // 2)}
  if not h["shared_classifier"]:
    layout["wcls"] = (V, D)
  return layout


def read_llama2c_arrays(path: PathLike) -> tuple[dict[str, int], dict[str, np.ndarray]]:
  """(header, {name: float32 array in llama2.c's layout}) of a version-0 checkpoint."""
  h = read_header(path)
  data = np.memmap(path, dtype="<f4", mode="r", offset=_HEADER_BYTES)
  arrays, pos = {}, 0
  for name, shape in _layout(h).items():
    n = int(np.prod(shape))
    arrays[name] = np.asarray(data[pos:pos + n], dtype=np.float32).reshape(shape)
    pos += n
  return h, arrays


def load_llama2c(path: PathLike, tokenizer_path: PathLike | None = None, *, dtype: str = "float32",
                 param_dtype: str = "float32") -> tuple[Transformer, dict, Any]:
  """Load a llama2.c version-0 checkpoint as `(model, params, tokenizer_or_None)`.

  The tokenizer is `tokenizer_path` (a SentencePiece `.model` or a tokenizer directory, via
  `pro_jax.models.tokenizer.load_tokenizer`); when None, a `tokenizer.model` or `tok{vocab}.model`
  next to the checkpoint is used if present, else None is returned.
  """
  path = pathlib.Path(path)
  h, a = read_llama2c_arrays(path)
  config = ModelConfig(
      arch="llama", vocab_size=h["vocab_size"], d_model=h["dim"], n_layers=h["n_layers"], n_heads=h["n_heads"],
      n_kv_heads=h["n_kv_heads"], mlp_dim=h["hidden_dim"], max_seq_len=h["seq_len"], norm_eps=1e-5,
      rope_theta=10000.0, tie_embeddings=h["shared_classifier"], bos_token_id=1, eos_token_id=2,
      dtype=dtype, param_dtype=param_dtype)
  model = Transformer(config)
  T = lambda w_LxOxI: np.swapaxes(w_LxOxI, -1, -2)  # noqa: E731 - [L, out, in] -> kernels [L, in, out]
  wq = np.stack([permute_rotary(w, h["n_heads"]) for w in a["wq"]])
  wk = np.stack([permute_rotary(w, h["n_kv_heads"]) for w in a["wk"]])
  params = {
      "embed": a["token_embedding"],
      "layers": {
          "attn_norm": {"scale": a["rms_att"]},
          "attn": {"q_proj": {"kernel": T(wq)}, "k_proj": {"kernel": T(wk)}, "v_proj": {"kernel": T(a["wv"])},
                   "o_proj": {"kernel": T(a["wo"])}},
          "mlp_norm": {"scale": a["rms_ffn"]},
          "mlp": {"gate_proj": {"kernel": T(a["w1"])}, "up_proj": {"kernel": T(a["w3"])},
                  "down_proj": {"kernel": T(a["w2"])}},
      },
      "final_norm": {"scale": a["rms_final"]},
  }
  if not h["shared_classifier"]:
    params["lm_head"] = {"kernel": a["wcls"].T}
  abstract = abstract_variables(model)["params"]
  shapes_ok = jax.tree.map(lambda x, s: tuple(x.shape) == tuple(s.shape), params, abstract)
  if not all(jax.tree.leaves(shapes_ok)):  # internal consistency: the layout above vs the model
    raise RuntimeError(f"internal: llama2.c layout does not match the model for {path}")
  params = jax.tree.map(lambda x, s: jax.device_put(np.ascontiguousarray(x).astype(s.dtype)), params, abstract)

  tokenizer = None
  if tokenizer_path is None:
    for cand in (path.parent / "tokenizer.model", path.parent / f"tok{h['vocab_size']}.model"):
      if cand.is_file():
        tokenizer_path = cand
        break
  if tokenizer_path is not None:
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) != h["vocab_size"]:
      raise Llama2cError(f"{tokenizer_path}: tokenizer has {len(tokenizer)} tokens, {path} has vocab "
                         f"{h['vocab_size']}")
  return model, params, tokenizer
