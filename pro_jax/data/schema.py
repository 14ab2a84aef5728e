"""The one multi-objective preference schema every builder and the embedded task produce.

An example is a plain dict::

  {
    "id": str,                     # unique within its source
    "source": str,                 # e.g. "hh_rlhf/harmless-base", "synthetic"
    "objectives": list[str],       # K objective names (same for every row of one dataset config)
    "prompt": list[{"role": str, "content": str}],   # roles system/user/assistant; ends with "user"
    "chosen": str,                 # preferred response ("" when the row has no pair)
    "rejected": str,               # dispreferred response ("" when the row has no pair)
    "pair_objectives": list[float],        # [K] label per objective: 1.0 chosen preferred on k,
                                   #   -1.0 rejected preferred on k, 0.0 no label for k
    "responses": list[str],        # [N] responses with per-objective scores (may be empty)
    "scores": list[list[float]],   # [N, K] scores (0.0 where not annotated)
    "score_mask": list[list[float]],       # [N, K] 1.0 where annotated
  }

`pro_jax.data.validate` checks rows against it.
"""

from __future__ import annotations

FIELDS = ("id", "source", "objectives", "prompt", "chosen", "rejected", "pair_objectives", "responses",
          "scores", "score_mask")
ROLES = ("system", "user", "assistant")


def user_prompt(text: str) -> list[dict]:
  """A single-turn prompt: ``[{"role": "user", "content": text}]``."""
  return [{"role": "user", "content": text}]


def make_example(*, id: str, source: str, objectives: list[str] | tuple[str, ...],  # noqa: A002
                 prompt: list[dict], chosen: str = "", rejected: str = "",
                 pair_objectives: list[float] | None = None, responses: list[str] | tuple = (),
                 scores: list[list[float]] | None = None,
                 score_mask: list[list[float]] | None = None) -> dict:
  """Builds a schema dict; omitted parts default to "absent" (no pair / no responses).

  ``pair_objectives`` defaults to all zeros (the row has no pair); ``scores`` /
  ``score_mask`` default to zeros / ones of shape [N, K] for N responses and K objectives.
  Nothing is validated here (see ``pro_jax.data.validate.validate_example``).
  """
  k = len(objectives)
  n = len(responses)
  if scores is None:
    scores = [[0.0] * k for _ in range(n)]
  if score_mask is None:
    score_mask = [[1.0] * k for _ in range(n)]
  return {
      "id": id,
      "source": source,
      "objectives": list(objectives),
      "prompt": [dict(turn) for turn in prompt],
      "chosen": chosen,
      "rejected": rejected,
      "pair_objectives": [0.0] * k if pair_objectives is None else list(pair_objectives),
      "responses": list(responses),
      "scores": [list(s) for s in scores],
      "score_mask": [list(m) for m in score_mask],
  }


def features():
  """The tfds ``FeaturesDict`` of the schema (used by every builder).

  Strings are ``Text``; ``prompt`` is a ``Sequence`` of ``{role, content}``; ``pair_objectives``
  is a float32 ``[K]`` tensor; ``scores`` / ``score_mask`` are float32 ``[N, K]`` tensors stored
  zlib-encoded (two unknown dimensions; N may be 0). Serialization and numpy decoding work
  without TensorFlow.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  f = tfds.features
  return f.FeaturesDict({
      "id": f.Text(),
      "source": f.Text(),
      "objectives": f.Sequence(f.Text()),
      "prompt": f.Sequence({"role": f.Text(), "content": f.Text()}),
      "chosen": f.Text(),
      "rejected": f.Text(),
      "pair_objectives": f.Tensor(shape=(None,), dtype=np.float32),
      "responses": f.Sequence(f.Text()),
      "scores": f.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib"),
      "score_mask": f.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib"),
  })


def to_tfds(example: dict) -> dict:
  """The plain dict in the form tfds encodes (``[N, K]`` float32 arrays, even when N = 0)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  k = len(example["objectives"])
  n = len(example["responses"])
  out = {name: example[name] for name in FIELDS}
  out["prompt"] = [{"role": t["role"], "content": t["content"]} for t in example["prompt"]]
  out["pair_objectives"] = np.asarray(example["pair_objectives"], np.float32).reshape(k)
  out["scores"] = np.asarray(example["scores"], np.float32).reshape(n, k)
  out["score_mask"] = np.asarray(example["score_mask"], np.float32).reshape(n, k)
  return out


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_tfds(decoded: dict) -> dict:
  """Turns a decoded tfds example (bytes, numpy arrays) back into the plain-dict form.

  Floats come back from float32 storage (exact for the ratings used here: quarters, integers).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  prompt = decoded["prompt"]
  roles, contents = list(prompt["role"]), list(prompt["content"])
  k = len(decoded["objectives"])
  n = len(decoded["responses"])
  return {
      "id": _text(decoded["id"]),
      "source": _text(decoded["source"]),
      "objectives": [_text(o) for o in decoded["objectives"]],
      "prompt": [{"role": _text(r), "content": _text(c)} for r, c in zip(roles, contents)],
      "chosen": _text(decoded["chosen"]),
      "rejected": _text(decoded["rejected"]),
      "pair_objectives": [float(x) for x in np.asarray(decoded["pair_objectives"]).reshape(k)],
      "responses": [_text(r) for r in decoded["responses"]],
      "scores": np.asarray(decoded["scores"], np.float64).reshape(n, k).tolist(),
      "score_mask": np.asarray(decoded["score_mask"], np.float64).reshape(n, k).tolist(),
  }
