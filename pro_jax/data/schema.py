"""The one multi-objective preference schema every builder and the embedded task produce.

An example is a plain dict::

  {
    "id": str,                     # unique within its source
    "source": str,                 # e.g. "hh_rlhf/harmless-base", "synthetic"
    "objectives": list[str],       # K objective names (same for every row of one dataset config)
    "prompt": list[{"role": str, "content": str}],   # roles system/user/assistant; ends with "user"
    "chosen": str,                 # preferred response ("" when the row has no pair)
    "rejected": str,               # dispreferred response ("" when the row has no pair)
    "pair_objectives": list[float],        # [K] 1.0 where (chosen, rejected) speaks for objective k
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
