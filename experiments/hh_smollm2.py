"""PRO on a REAL chat model: SmolLM2-135M-Instruct (GGUF) on real HH-RLHF, CPU-sized, 3 seeds.

    python experiments/hh_smollm2.py --workdir /work/runs/hh_smollm2 [--data-dir ../shared/data]
    python experiments/hh_smollm2.py --workdir ... --preset quick          # the test's setting

Stages (a progress line each; WORKDIR/report.md, report.json and plots at the end):

0. data: the HH-RLHF helpful-base and harmless-base test files (`pro_jax.data.sources`), grouped by
   the conversation's FIRST user turn and split BY GROUP into train / held-out (no prompt, and no
   conversation opener, on both sides: asserted). Train pairs are cut into two halves by group:
   half A trains the reward model PRO uses, half B the independent EVALUATION reward model. Prompts
   are schema messages (user / assistant turns), rendered with the model's ChatML template.
1. features (seed-independent, cached in WORKDIR/cache-KEY): ONE forward of the frozen SmolLM2 over
   every pair sequence (prompt + response + EOS): the final hidden state at the last token, the final
   hidden states and the block-`mid_layer` residual stream mean-pooled over the response, and the final
   hidden states mean-pooled over the prompt (the adapter's h(x)).
2. candidates (seed-independent, cached): n sampled responses per held-out generation prompt from
   the instruct model (`pro_jax.models.generate` through `pro_jax.stages.evaluate.generate_texts`: KV
   cache, temperature / top-p) and their features.
Per seed:
3. reward models: 2 linear heads (helpful, harmless) on the standardized frozen features, trained with
   the masked Bradley-Terry loss (`pro_jax.pro.losses.bradley_terry_multi`) through the engine's
   jitted train step (`build_train_step`, AdamW); helpful-base pairs speak for "helpful",
   harmless-base for "harmless". RM = half A, seed s; eval RM = half B, seed s + 1000. Held-out pair
   accuracy per objective for both.
4. z-score statistics (`fit_norm_stats`) of each RM over its own training responses; targets
   w*(x) = softmax(r~(x, y_w) / tau) (`compute_targets`) for every training prompt.
5. adapter (`AdapterMLP` + `adapter_kl`, engine step) on the cached prompt features: held-out KL,
   top-1, Spearman vs the RM's held-out targets, and the AUC with which its harmless weight
   separates held-out harmless-base from helpful-base prompts.
6. PRO at inference: best-of-n among the cached candidates by sum_k w_k r~_k (RM) with w = the
   adapter's weights ("PRO"), every vector of a fixed grid, uniform, and w* (the RM's target from
   the held-out chosen response); utility U = sum_k w*_E,k(x) r~_E,k(x, y) from the EVALUATION RM
   (w*_E = softmax(r~_E(x, y_w) / tau) of the held-out chosen response). Paired bootstrap of
   PRO - best fixed vector (the best one re-picked in every resample).
7. PRO in training (seeds in `policy_seeds`): a weight-conditioned LoRA policy (RiC-style text
   conditioning with `best_of` draws over the simplex: `pro_jax.stages.policy.best_of_examples` and the
   engine's SFT loss via `make_task` / `train`) on half A's chosen / rejected responses scored by the
   RM; evaluated by generating on held-out prompts conditioned on the adapter's weights vs each
   vector of a fixed grid, scored by the eval RM.

Why frozen features: one SmolLM2 forward costs ~0.27 GFLOP per token and the CPU is 2 shared cores;
reward heads and the adapter on features computed once make every seed cost seconds instead of a
30-layer forward + backward per step (docs/results.md has the timings).

See docs/results.md ("Real model") for the choices, sizes and timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np

OBJECTIVES = ("helpful", "harmless")
FILES = {"helpful": "hh_rlhf/helpful-base", "harmless": "hh_rlhf/harmless-base"}
SMOLLM2 = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class SmolConfig:
  """Sizes and choices of the experiment (defaults: the 3-seed CPU run)."""

  model: str = "gguf:" + SMOLLM2  # "gguf:FILE" | "llama2c:FILE" (relative paths: under --data-dir)
  seeds: str = "0,1,2"
  data_seed: int = 0  # the split, the subsets and the candidates (seed-independent, cached)
  held_out_fraction: float = 0.3  # of the first-turn groups of each file
  train_pairs_per_file: int = 200  # split by group into half A (RM) and half B (eval RM)
  held_pairs_per_file: int = 50  # RM accuracy, adapter metrics; generation prompts come from here
  gen_prompts_per_file: int = 32  # held-out prompts per file for best-of-n
  max_prompt_len: int = 64  # tokens, cut from the left (the end of the dialogue)
  max_response_len: int = 48  # tokens incl. EOS; longer responses are cut (as text)
  feature_batch: int = 32
  feature_bucket: int = 32  # feature batches padded to a multiple of this length; 0 = the full length (one shape)
  mid_layer: int = 20  # the middle block whose residual stream is one of the RM's features
  rm_steps: int = 400
  rm_batch: int = 64
  rm_lr: float = 3e-3
  rm_weight_decay: float = 0.05
  tau: float = 1.0
  adapter_steps: int = 300
  adapter_batch: int = 32
  adapter_lr: float = 3e-3
  adapter_hidden: int = 256
  adapter_layers: int = 2
  n_samples: int = 4  # candidates per prompt
  temperature: float = 0.8
  top_p: float = 0.95
  gen_batch: int = 64
  grid_step: float = 0.1
  bootstrap: int = 2000
  # the trained weight-conditioned policy
  policy_seeds: str = "0,1,2"  # "" = skip (a LoRA step on 2 shared cores costs ~10-30 s; ~18-40 min a seed)
  policy_steps: int = 16
  policy_batch: int = 8
  policy_lr: float = 1e-3
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
  policy_samples: int = 2  # Dirichlet weight draws per training pair (best_of conditioning)
  policy_concentration: float = 0.5
  policy_prompts_per_file: int = 12  # held-out prompts per file the policy generates for
  policy_grid_step: float = 0.25
  policy_prompt_extra: int = 16  # prompt tokens added for the weight text (0: the policy's prompts are cut
  # to max_prompt_len like the candidates', so both `generate` calls share one compiled shape)


PRESETS = {
    # the test's quick variant: the same code and the same real model, small sizes, and as few
    # distinct compiled shapes as possible (one feature shape, one `generate` shape shared by the
    # candidates and the policy's evaluation, one reward-model step for both reward models)
    "quick": dict(seeds="0", train_pairs_per_file=16, held_pairs_per_file=8, gen_prompts_per_file=4,
                  max_prompt_len=32, max_response_len=16, rm_steps=100, rm_batch=8, adapter_steps=60,
                  adapter_batch=16, n_samples=2, gen_batch=16, bootstrap=500, policy_seeds="0", policy_steps=1,
                  policy_batch=8, policy_samples=1, policy_prompts_per_file=2, policy_grid_step=1.0,
                  policy_prompt_extra=0, feature_batch=16, feature_bucket=0),
}


def _say(msg: str) -> None:
  print(f"[hh-smollm2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data: split by prompt group


def group_key(prompt: list[dict]) -> str:
  """The conversation's first user turn, case- and space-normalized: prompts sharing it are one group."""
  first = next((m["content"] for m in prompt if m["role"] == "user"), "")
  return " ".join(str(first).lower().split())


def prompt_key(prompt: list[dict]) -> str:
  return json.dumps([[m["role"], m["content"]] for m in prompt])


def split_by_group(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
  """Deterministic split of rows into (train, held-out) with every first-turn group on ONE side."""
  groups = sorted({group_key(r["prompt"]) for r in rows})
  order = np.random.default_rng(seed).permutation(len(groups))
  held = {groups[i] for i in order[:int(round(len(groups) * fraction))]}
  train = [r for r in rows if group_key(r["prompt"]) not in held]
  out = [r for r in rows if group_key(r["prompt"]) in held]
  return train, out


def take(rows: list[dict], n: int, seed: int) -> list[dict]:
  """A seeded subset of n rows (all when n <= 0 or n >= len), original order kept."""
  if n <= 0 or n >= len(rows):
    return list(rows)
  idx = np.sort(np.random.default_rng(seed).permutation(len(rows))[:n])
  return [rows[i] for i in idx]


def halves_by_group(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
  """Rows cut into two halves by first-turn group (no group in both)."""
  return split_by_group(rows, 0.5, seed + 7)


def overlap(a: list[dict], b: list[dict]) -> dict[str, int]:
  """Prompts and first-turn groups present on both sides (must be 0)."""
  return {"prompts": len({prompt_key(r["prompt"]) for r in a} & {prompt_key(r["prompt"]) for r in b}),
          "groups": len({group_key(r["prompt"]) for r in a} & {group_key(r["prompt"]) for r in b})}


def prepare_data(data_dir: pathlib.Path, c: SmolConfig, tokenizer: Any) -> dict[str, Any]:
  """Rows per role: rm_a / rm_b (train halves), held (held-out pairs), gen (held-out prompts for
  best-of-n, a subset of held), pol (the policy's evaluation prompts, a subset of gen). Each row is a
  schema example plus "file" (its objective's file); responses cut to max_response_len tokens."""
  from pro_jax.data import sources
  from pro_jax.stages.rm import fit_responses
  out: dict[str, list[dict]] = {"rm_a": [], "rm_b": [], "held": [], "gen": [], "pol": []}
  split_info = {}
  for obj, name in FILES.items():
    ex = [dict(e, file=obj) for e in sources.load_examples(name, "test", manual_dir=str(data_dir / "hh_rlhf"),
                                                          mode="lenient")]
    train, held = split_by_group(ex, c.held_out_fraction, c.data_seed)
    ov = overlap(train, held)
    if ov["prompts"] or ov["groups"]:
      raise AssertionError(f"{name}: the prompt split leaks {ov}")
    split_info[obj] = {"rows": len(ex), "train": len(train), "held_out": len(held),
                       "train_groups": len({group_key(r["prompt"]) for r in train}),
                       "held_out_groups": len({group_key(r["prompt"]) for r in held})}
    train = take(train, c.train_pairs_per_file, c.data_seed + 1)
    held = take(held, c.held_pairs_per_file, c.data_seed + 2)
    a, b = halves_by_group(train, c.data_seed)
    gen = take(held, c.gen_prompts_per_file, c.data_seed + 3)
    pol = take(gen, c.policy_prompts_per_file, c.data_seed + 4)
    for k, v in (("rm_a", a), ("rm_b", b), ("held", held), ("gen", gen), ("pol", pol)):
      out[k] += v
  # the two files' prompts must not cross sides either
  for x, y in (("rm_a", "held"), ("rm_b", "held"), ("rm_a", "rm_b")):
    ov = overlap(out[x], out[y])
    if ov["prompts"] or ov["groups"]:
      raise AssertionError(f"prompt overlap between {x} and {y}: {ov}")
  for k in ("rm_a", "rm_b", "held"):
    out[k], _ = fit_responses(out[k], tokenizer, c.max_response_len)
  held_by = {r["id"] + r["file"]: r for r in out["held"]}  # gen / pol rows: the (cut) held-out rows
  out["gen"] = [held_by[r["id"] + r["file"]] for r in out["gen"]]
  out["pol"] = [held_by[r["id"] + r["file"]] for r in out["pol"]]
  return {"rows": out, "split": split_info}


# ---------------------------------------------------------------------------------------------
# Statistics


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
  """P(a positive scores above a negative), ties count half."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  gt = (pos[:, None] > neg[None, :]).mean()
  eq = (pos[:, None] == neg[None, :]).mean()
  return float(gt + 0.5 * eq)


def paired_bootstrap(u_pro_N: np.ndarray, u_fixed_NxF: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, float]:
  """PRO minus the best fixed vector, with a paired (prompt-resampling) percentile bootstrap.

  delta = mean_x U_PRO(x) - max_f mean_x U_f(x). Each resample draws N prompts with replacement
  (the same draw for PRO and every fixed vector: paired) and re-picks the best fixed vector on it,
  so the interval accounts for choosing the best fixed vector after the fact (conservative for PRO).
  Returns {"delta", "lo", "hi", "p_le_0"} (p_le_0: share of resamples with delta <= 0).
  """
  u_pro = np.asarray(u_pro_N, np.float64)
  u_fix = np.asarray(u_fixed_NxF, np.float64)
  if u_fix.ndim == 1:
    u_fix = u_fix[:, None]
  n = len(u_pro)
  if u_fix.shape[0] != n or n == 0:
    raise ValueError(f"paired_bootstrap: {n} PRO utilities and fixed utilities of shape {u_fix.shape}")
  delta = u_pro.mean() - u_fix.mean(0).max()
  idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
  boots = u_pro[idx].mean(1) - u_fix[idx].mean(1).max(1)
  lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
  return {"delta": float(delta), "lo": float(lo), "hi": float(hi), "p_le_0": float(np.mean(boots <= 0))}


# ---------------------------------------------------------------------------------------------
# Model pieces: the frozen lower stack, the trained top (reward model), features


def load_model(spec: str, data_dir: pathlib.Path):
  """(ModelConfig, params, tokenizer) of a "gguf:FILE" or "llama2c:FILE" source (paths under data_dir
  unless absolute)."""
  kind, _, path = spec.partition(":")
  p = pathlib.Path(path)
  if not p.is_absolute():
    p = data_dir / p
  if kind == "gguf":
    from pro_jax.models.gguf import load_gguf
    model, params, tok = load_gguf(p, dtype="float32", param_dtype="float32")
  elif kind == "llama2c":
    from pro_jax.models.llama2c import load_llama2c
    model, params, tok = load_llama2c(p)
  else:
    raise ValueError(f"model must be 'gguf:FILE' or 'llama2c:FILE', got {spec!r}")
  return model.config, params, tok


def _run_blocks(cfg: Any, layer_params: Any, n: int, x_BxLxD: Any, cos: Any, sin: Any, amask: Any) -> Any:
  """n scanned `Block`s of the library's transformer (params stacked on axis 0) on residual states."""
  import flax.linen as nn
  from pro_jax.models.transformer import Block
  stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast, 0),
                  length=n)
  x, _ = stack(cfg.replace(n_layers=n), True).apply({"params": layer_params}, x_BxLxD, (cos, sin, amask, 0),
                                                     (None, None))  # per layer: (no KV cache, no local/global flag)
  return x


FEATURES = ("last", "response_mean", "mid_response_mean")


class Backbone:
  """The frozen model as a feature extractor: ONE forward per sequence (prompt + response + EOS), giving

  * ``last``: the final (normed) hidden state at the last real token (the library's score-head input),
  * ``response_mean``: final hidden states mean-pooled over the response tokens,
  * ``mid_response_mean``: the residual stream after block `mid_layer`, RMS-normalized, mean-pooled over
    the response tokens (middle layers often carry more linearly readable content than the last),
  * ``prompt``: final hidden states mean-pooled over the PROMPT tokens = h(x) of the adapter (causal
    attention: identical to a prompt-only forward).
  """

  def __init__(self, cfg: Any, params: Any, mid_layer: int):
    import jax
    import jax.numpy as jnp
    from pro_jax.models.transformer import make_attention_mask, positions_from_mask, rope_cos_sin
    from pro_jax.pro.ops import mean_pool
    self.cfg = cfg.replace(head="none", lora=None, value_head=False)
    if not 0 < mid_layer < cfg.n_layers:
      raise ValueError(f"mid_layer must be in (0, {cfg.n_layers}), got {mid_layer}")
    self.mid = mid_layer
    lower = jax.tree.map(lambda x: x[:mid_layer], params["layers"])
    upper = jax.tree.map(lambda x: x[mid_layer:], params["layers"])
    mcfg, n = self.cfg, cfg.n_layers

    def feats(embed, lower, upper, norm, tokens, mask, plen):
      from pro_jax.models.transformer import LayerNorm, RMSNorm, last_token_index
      B, L = tokens.shape
      cos, sin = rope_cos_sin(mcfg, positions_from_mask(mask))
      amask = make_attention_mask(mask, L, L, sliding_window=mcfg.sliding_window)
      x = jnp.take(embed, tokens, axis=0).astype(jnp.float32)
      x_mid = _run_blocks(mcfg, lower, mid_layer, x, cos, sin, amask)
      x = _run_blocks(mcfg, upper, n - mid_layer, x_mid, cos, sin, amask)
      h = (LayerNorm if mcfg.arch == "gpt2" else RMSNorm)(mcfg).apply({"params": norm}, x)
      pos = jnp.arange(L)[None]
      pmask = (pos < plen[:, None]) & (mask > 0)
      rmask = (pos >= plen[:, None]) & (mask > 0)
      idx = last_token_index(mask, L, B)
      mid_n = x_mid * jax.lax.rsqrt(jnp.mean(x_mid * x_mid, -1, keepdims=True) + 1e-6)
      return {"last": jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0],
              "response_mean": mean_pool(h, rmask), "mid_response_mean": mean_pool(mid_n, rmask),
              "prompt": mean_pool(h, pmask)}

    self._fn = jax.jit(feats)
    self._args = (params["embed"], lower, upper, params["final_norm"])

  def features(self, tokens_NxL: np.ndarray, mask_NxL: np.ndarray, plen_N: np.ndarray, batch: int,
               bucket: int = 32) -> dict[str, np.ndarray]:
    """Features {name: [N, D] float32} (rows batched by length, padded to a multiple of `bucket`;
    `bucket` <= 0: every batch padded to the full length L, so one compiled shape serves every call)."""
    n, L = tokens_NxL.shape
    D = self.cfg.d_model
    out = {k: np.zeros((n, D), np.float32) for k in FEATURES + ("prompt",)}
    lengths = mask_NxL.sum(1)
    order = np.argsort(-lengths, kind="stable")
    for s in range(0, n, batch):
      idx = order[s:s + batch]
      Lb = L if bucket <= 0 else min(L, -(-int(lengths[idx].max()) // bucket) * bucket)
      t, m, p = tokens_NxL[idx, :Lb], mask_NxL[idx, :Lb], plen_N[idx]
      k = len(idx)
      if k < batch:
        t, m, p = (np.concatenate([a, np.repeat(a[-1:], batch - k, 0)]) for a in (t, m, p))
      res = self._fn(*self._args, t, m, p)
      for name in out:
        out[name][idx] = np.asarray(res[name])[:k]
    return out


def rm_inputs(f: dict[str, np.ndarray]) -> np.ndarray:
  """The reward model's input [N, F]: the features of `FEATURES` side by side."""
  return np.concatenate([f[k] for k in FEATURES], axis=1)


def rm_scores(rm: Any, x_NxF: Any) -> Any:
  """K linear heads on standardized frozen features: ((x - mu) / sd) @ W + b -> [N, K]."""
  return ((x_NxF - rm["mu"]) / rm["sd"]) @ rm["head"]["kernel"] + rm["head"]["bias"]


# ---------------------------------------------------------------------------------------------
# Tokenization to fixed arrays


def tokenize_pairs(tok: Any, prompts: list, responses: list[str], c: SmolConfig) -> dict[str, np.ndarray]:
  """Right-padded prompt + response (+ EOS) [N, L] with the prompt length per row (prompt cut from the
  left to max_prompt_len, response cut to max_response_len keeping EOS)."""
  from pro_jax.data.pipeline import pad_right, round_up
  from pro_jax.data.tokenize import encode, normalize_messages, pad_id, truncate_prompt
  p_ids, r_ids = encode(tok, [normalize_messages(p) for p in prompts], list(responses), "auto")
  bos = getattr(tok, "bos_token_id", None)
  rows, plen = [], []
  for p, r in zip(p_ids, r_ids):
    p = truncate_prompt(p, c.max_prompt_len, bos)
    if len(r) > c.max_response_len:
      r = r[:c.max_response_len - 1] + r[-1:]
    rows.append(np.asarray(p + r, np.int32))
    plen.append(len(p))
  L = round_up(c.max_prompt_len + c.max_response_len, 8)
  tokens, mask = pad_right(rows, L, pad_id(tok))
  return {"tokens": tokens, "mask": mask, "prompt_len": np.asarray(plen, np.int32)}


# ---------------------------------------------------------------------------------------------
# Training small parameter trees with the engine's jitted train step


_STEPS: dict[tuple, Any] = {}  # fit's jitted train steps by (loss_fn, steps, lr, weight_decay, warmup)


def fit(loss_fn, params: Any, data: dict[str, np.ndarray], *, steps: int, batch: int, lr: float, seed: int,
        frozen: dict | None = None, warmup: int = 10, name: str = "fit", weight_decay: float = 0.0,
        log_every: int = 0) -> tuple[Any, list[float]]:
  """Train `params` with `loss_fn(params, frozen, batch, rng)` through `build_train_step` (AdamW,
  warmup + cosine, clipping, the non-finite guard) on in-memory arrays, shuffled each epoch."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from pro_jax.stages.stage import engine_config
  from pro_jax.sharding import make_mesh
  from pro_jax.train.optimizer import make_optimizer
  from pro_jax.train.state import init_state
  from pro_jax.train.step import build_train_step
  cfg = engine_config(**{"optim.lr": lr, "optim.warmup_steps": min(warmup, steps),
                          "optim.weight_decay": weight_decay})
  opt, sched = make_optimizer(cfg.optim, steps)
  mesh = make_mesh(devices=jax.devices()[:1])
  rep = NamedSharding(mesh, P())
  state = init_state(params, opt, jax.random.PRNGKey(seed))
  frozen = frozen or {}
  n = len(next(iter(data.values())))
  batch = min(batch, n)
  state_sh = jax.tree.map(lambda _: rep, state)
  # the state placed as the step returns it: else the first call compiles once more for the
  # uncommitted arrays; and one jitted step per (loss, schedule) reused across calls of the same shapes
  state = jax.device_put(state, state_sh)
  frozen = jax.device_put(frozen, jax.tree.map(lambda _: rep, frozen))
  key = (loss_fn, steps, lr, weight_decay, min(warmup, steps))
  step = _STEPS.get(key)
  if step is None:
    step = _STEPS[key] = build_train_step(loss_fn, opt, mesh=mesh, state_shardings=state_sh,
                                          frozen_shardings=jax.tree.map(lambda _: rep, frozen),
                                          batch_shardings={k: rep for k in data}, schedule=sched)
  rng = np.random.default_rng(seed)
  order, pos, losses = rng.permutation(n), 0, []
  for _ in range(steps):
    if pos + batch > n:
      order, pos = rng.permutation(n), 0
    idx = np.sort(order[pos:pos + batch])
    pos += batch
    state, metrics = step(state, frozen, {k: v[idx] for k, v in data.items()})
    losses.append(float(metrics["loss"]))
    if log_every and (len(losses) % log_every == 0 or len(losses) == 1):
      _say(f"  {name} step {len(losses)}/{steps}: loss {losses[-1]:.4f}")
  return jax.device_get(state.params), losses


# ---------------------------------------------------------------------------------------------
# The seed-independent cache: split, lower states, prompt features, candidates


SHARED_FIELDS = ("model", "data_seed", "held_out_fraction", "train_pairs_per_file", "held_pairs_per_file",
                 "gen_prompts_per_file", "max_prompt_len", "max_response_len", "mid_layer", "n_samples",
                 "temperature", "top_p", "policy_prompts_per_file")


def _shared_key(c: SmolConfig) -> str:
  return hashlib.sha256(json.dumps({f: getattr(c, f) for f in SHARED_FIELDS}, sort_keys=True).encode()).hexdigest()[:12]


class Shared:
  """Everything that does not depend on the seed, computed once and kept in WORKDIR/cache-KEY."""

  def __init__(self, workdir: str, data_dir: pathlib.Path, c: SmolConfig, timings: dict[str, float]):
    from pro_jax.models import Transformer
    self.c = c
    self.dir = os.path.join(workdir, f"cache-{_shared_key(c)}")
    os.makedirs(self.dir, exist_ok=True)
    t = time.perf_counter()
    self.cfg, self.params, self.tok = load_model(c.model, data_dir)
    self.model = Transformer(self.cfg)
    self.bb = Backbone(self.cfg, self.params, c.mid_layer)
    timings["load_model"] = time.perf_counter() - t
    _say(f"model {c.model}: {self.cfg.num_params():,} params, {self.cfg.n_layers} layers "
         f"({timings['load_model']:.0f} s)")

    t = time.perf_counter()
    d = prepare_data(data_dir, c, self.tok)
    self.rows, self.split = d["rows"], d["split"]
    timings["data"] = time.perf_counter() - t
    r = self.rows
    _say("data: " + "; ".join(f"{o}: {s['train']} train / {s['held_out']} held-out pairs "
                              f"({s['train_groups']} / {s['held_out_groups']} first-turn groups)"
                              for o, s in self.split.items())
         + f"; used: RM {len(r['rm_a'])}, eval RM {len(r['rm_b'])}, held-out {len(r['held'])}, "
         f"best-of-n prompts {len(r['gen'])}, policy prompts {len(r['pol'])}; 0 prompt / group overlap")

    # frozen features of every pair sequence (chosen and rejected of rm_a, rm_b, held)
    t = time.perf_counter()
    self.pairs: dict[str, dict[str, np.ndarray]] = {}
    for k in ("rm_a", "rm_b", "held"):  # one file each: a stopped run keeps what it finished
      path = os.path.join(self.dir, f"pairs-{k}.npz")
      if os.path.exists(path):
        z = np.load(path)
        self.pairs[k] = {f: z[f] for f in ("chosen", "rejected", "prompt", "obj")}
        continue
      rows = r[k]
      prompts = [x["prompt"] for x in rows]
      side = {}
      for which in ("chosen", "rejected"):
        tk = tokenize_pairs(self.tok, prompts, [x[which] for x in rows], c)
        side[which] = self.bb.features(tk["tokens"], tk["mask"], tk["prompt_len"], c.feature_batch,
                                       c.feature_bucket)
      self.pairs[k] = {"chosen": rm_inputs(side["chosen"]), "rejected": rm_inputs(side["rejected"]),
                       "prompt": side["chosen"]["prompt"],
                       "obj": np.asarray([x["pair_objectives"] for x in rows], np.float32)}
      np.savez(path + ".tmp.npz", **self.pairs[k])
      os.replace(path + ".tmp.npz", path)
      _say(f"  features of {k}: {2 * len(rows)} sequences ({time.perf_counter() - t:.0f} s)")
    timings["features_pairs"] = time.perf_counter() - t
    n_seq = 2 * sum(len(v["chosen"]) for v in self.pairs.values())
    _say(f"features: one frozen forward of {n_seq} pair sequences ({timings['features_pairs']:.0f} s)")

    # candidates: n samples per generation prompt from the instruct model, and their features
    t = time.perf_counter()
    cpath = os.path.join(self.dir, "candidates.json")
    spath = os.path.join(self.dir, "candidates.npz")
    if os.path.exists(cpath) and os.path.exists(spath):
      with open(cpath) as f:
        self.cands = json.load(f)
      self.cand_f = np.load(spath)["f"]
    else:
      from pro_jax.stages.evaluate import GenerationConfig, generate_texts
      gen = GenerationConfig(max_prompt_len=c.max_prompt_len, max_new_tokens=c.max_response_len - 1,
                             batch_size=c.gen_batch, greedy=False, temperature=c.temperature, top_p=c.top_p,
                             seed=c.data_seed, template="auto")
      prompts = [x["prompt"] for x in r["gen"] for _ in range(c.n_samples)]
      texts, _, _ = generate_texts(self.model, {"params": self.params}, self.tok, prompts, gen)
      _say(f"  sampled {len(texts)} candidates ({time.perf_counter() - t:.0f} s)")
      self.cands = [texts[i * c.n_samples:(i + 1) * c.n_samples] for i in range(len(r["gen"]))]
      self.cand_f = self.response_features(prompts, texts)
      np.savez(spath + ".tmp.npz", f=self.cand_f)
      os.replace(spath + ".tmp.npz", spath)
      with open(cpath, "w") as f:
        json.dump(self.cands, f)
    timings["candidates"] = time.perf_counter() - t
    _say(f"candidates: {c.n_samples} samples x {len(r['gen'])} held-out prompts (T={c.temperature}, "
         f"top-p {c.top_p}, <= {c.max_response_len - 1} new tokens) + their features ({timings['candidates']:.0f} s)")

  def response_features(self, prompts: list, texts: list[str]) -> np.ndarray:
    """RM inputs [N, F] of (prompt, response) pairs."""
    tk = tokenize_pairs(self.tok, prompts, texts, self.c)
    return rm_inputs(self.bb.features(tk["tokens"], tk["mask"], tk["prompt_len"], self.c.feature_batch,
                                      self.c.feature_bucket))

  def gen_index(self) -> np.ndarray:
    """Row of each generation prompt in the held-out arrays."""
    pos = {id(x): i for i, x in enumerate(self.rows["held"])}
    return np.asarray([pos[id(x)] for x in self.rows["gen"]])

  def pol_index(self) -> np.ndarray:
    pos = {id(x): i for i, x in enumerate(self.rows["gen"])}
    return np.asarray([pos[id(x)] for x in self.rows["pol"]])


# ---------------------------------------------------------------------------------------------
# Per seed


def _rm_loss(params: Any, frozen: Any, batch: dict, rng: Any) -> tuple[Any, dict]:
  """Masked Bradley-Terry loss of the linear heads (frozen: the features' mean and sd)."""
  from pro_jax.pro.losses import bradley_terry_multi
  del rng
  rm = {**params, "mu": frozen["mu"], "sd": frozen["sd"]}
  loss, metrics = bradley_terry_multi(rm_scores(rm, batch["xc"]), rm_scores(rm, batch["xr"]), batch["obj"],
                                      OBJECTIVES)
  return loss, {k: v for k, v in metrics.items() if "/" not in k}


def train_rm(sh: Shared, half: str, seed: int, steps: int) -> tuple[Any, list[float]]:
  """Two linear heads on the standardized frozen features, masked Bradley-Terry loss, engine step."""
  import jax
  import jax.numpy as jnp
  c = sh.c
  p = sh.pairs[half]
  both = np.concatenate([p["chosen"], p["rejected"]])
  mu, sd = both.mean(0), both.std(0) + 1e-6

  F, K = both.shape[1], len(OBJECTIVES)
  init = {"head": {"kernel": 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (F, K), jnp.float32),
                   "bias": jnp.zeros((K,), jnp.float32)}}
  data = {"xc": p["chosen"], "xr": p["rejected"], "obj": p["obj"]}
  params, losses = fit(_rm_loss, init, data, steps=steps, batch=c.rm_batch, lr=c.rm_lr, seed=seed,
                       frozen={"mu": jnp.asarray(mu), "sd": jnp.asarray(sd)}, weight_decay=c.rm_weight_decay)
  return {**params, "mu": mu, "sd": sd}, losses


def score(rm: Any, x_NxF: np.ndarray) -> np.ndarray:
  """Raw scores [N, K] of RM inputs [N, F]."""
  return np.asarray(rm_scores(rm, np.asarray(x_NxF, np.float32)), np.float64)


def pair_accuracy(sh: Shared, rm: Any, half: str) -> dict[str, Any]:
  p = sh.pairs[half]
  rc, rr = score(rm, p["chosen"]), score(rm, p["rejected"])
  acc, cnt = {}, {}
  for k, o in enumerate(OBJECTIVES):
    sel = p["obj"][:, k] > 0
    acc[o], cnt[o] = float(np.mean(rc[sel, k] > rr[sel, k])), int(sel.sum())
  return {"accuracy": acc, "count": cnt, "chosen": rc, "rejected": rr}


def fixed_grid(step: float) -> np.ndarray:
  from pro_jax.pro.weights import simplex_grid
  return np.asarray(simplex_grid(len(OBJECTIVES), step), np.float64)


def wname(w) -> str:
  return "fixed[" + ",".join(f"{x:.2f}" for x in w) + "]"


def train_adapter(sh: Shared, feats: np.ndarray, targets: np.ndarray, seed: int) -> tuple[Any, Any]:
  """The library's AdapterMLP trained with its KL loss on cached prompt features; returns
  (params, weights_fn features -> [N, K])."""
  import jax
  from pro_jax.stages.adapter import AdapterMLP, adapter_variables
  from pro_jax.pro.losses import adapter_kl
  c = sh.c
  mlp = AdapterMLP(len(OBJECTIVES), hidden=c.adapter_hidden, layers=c.adapter_layers)

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    return adapter_kl(batch["w"], mlp.apply(params, batch["h"]))

  init = jax.jit(lambda r: adapter_variables(mlp, feats.shape[1], r))(jax.random.PRNGKey(seed))  # one compile, not
  # one per eager op of the init
  params, losses = fit(loss_fn, init, {"h": feats.astype(np.float32), "w": targets.astype(np.float32)},
                       steps=c.adapter_steps, batch=c.adapter_batch, lr=c.adapter_lr, seed=seed)
  fn = jax.jit(lambda h: jax.nn.softmax(mlp.apply(params, h), axis=-1))
  return params, lambda h: np.asarray(fn(np.asarray(h, np.float32)), np.float64)


def best_of_n(z_sel_NxSxK: np.ndarray, w_NxK: np.ndarray) -> np.ndarray:
  """Index [N] of the candidate maximizing sum_k w_k r~_k (first on ties)."""
  return np.argmax(np.einsum("nsk,nk->ns", z_sel_NxSxK, w_NxK), axis=1)


def run_seed(sh: Shared, seed: int, out_dir: str) -> dict[str, Any]:
  from pro_jax.stages.adapter import compute_targets, evaluate_adapter
  from pro_jax.pro.metrics import utility, win_rate
  from pro_jax.pro.normalize import fit_norm_stats
  c, rows = sh.c, sh.rows
  os.makedirs(out_dir, exist_ok=True)
  res: dict[str, Any] = {"seed": seed, "timings_s": {}}
  T = res["timings_s"]

  # 3. reward models
  t = time.perf_counter()
  rm, rm_losses = train_rm(sh, "rm_a", seed, c.rm_steps)
  ev, ev_losses = train_rm(sh, "rm_b", seed + 1000, c.rm_steps)
  acc = {"rm": pair_accuracy(sh, rm, "held"), "eval_rm": pair_accuracy(sh, ev, "held")}
  own = {"rm": pair_accuracy(sh, rm, "rm_a"), "eval_rm": pair_accuracy(sh, ev, "rm_b")}
  res["rm"] = {k: {"held_out_accuracy": acc[k]["accuracy"], "held_out_pairs": acc[k]["count"],
                   "train_accuracy": own[k]["accuracy"]} for k in acc}
  res["rm"]["rm"]["loss_first_last"] = [rm_losses[0], float(np.mean(rm_losses[-10:]))]
  res["rm"]["eval_rm"]["loss_first_last"] = [ev_losses[0], float(np.mean(ev_losses[-10:]))]
  T["reward_models"] = time.perf_counter() - t
  _say(f"seed {seed} reward models ({c.rm_steps} steps each): held-out accuracy RM "
       + ", ".join(f"{o} {v:.3f}" for o, v in acc["rm"]["accuracy"].items()) + "; eval RM "
       + ", ".join(f"{o} {v:.3f}" for o, v in acc["eval_rm"]["accuracy"].items())
       + f" ({T['reward_models']:.0f} s)")

  # 4. normalization and targets
  t = time.perf_counter()
  norm = fit_norm_stats(np.concatenate([own["rm"]["chosen"], own["rm"]["rejected"]]), OBJECTIVES, method="zscore")
  norm_e = fit_norm_stats(np.concatenate([own["eval_rm"]["chosen"], own["eval_rm"]["rejected"]]), OBJECTIVES,
                          method="zscore")
  train_feats = np.concatenate([sh.pairs["rm_a"]["prompt"], sh.pairs["rm_b"]["prompt"]])
  train_chosen = np.concatenate([own["rm"]["chosen"], score(rm, sh.pairs["rm_b"]["chosen"])])
  targets = compute_targets(train_chosen, norm, c.tau)
  held_t = compute_targets(acc["rm"]["chosen"], norm, c.tau)
  held_t_e = compute_targets(acc["eval_rm"]["chosen"], norm_e, c.tau)
  files_held = np.asarray([x["file"] for x in rows["held"]])
  files_train = np.asarray([x["file"] for x in rows["rm_a"] + rows["rm_b"]])
  res["norm"] = {"rm": norm.to_dict(), "eval_rm": norm_e.to_dict()}
  res["mean_target_train"] = {f: targets[files_train == f].mean(0).tolist() for f in OBJECTIVES}
  res["mean_target_held_out"] = {f: held_t[files_held == f].mean(0).tolist() for f in OBJECTIVES}
  res["mean_eval_target_held_out"] = {f: held_t_e[files_held == f].mean(0).tolist() for f in OBJECTIVES}
  T["norm_targets"] = time.perf_counter() - t

  # 5. adapter
  t = time.perf_counter()
  _, adapter = train_adapter(sh, train_feats, targets, seed)
  w_held = adapter(sh.pairs["held"]["prompt"])
  am = evaluate_adapter(w_held, held_t)
  h = OBJECTIVES.index("harmless")
  split_auc = auc(w_held[files_held == "harmless", h], w_held[files_held == "helpful", h])
  res["adapter"] = dict(am, split_auc=split_auc,
                        mean_weight_held_out={f: w_held[files_held == f].mean(0).tolist() for f in OBJECTIVES},
                        target_split_auc=auc(held_t[files_held == "harmless", h], held_t[files_held == "helpful", h]))
  T["adapter"] = time.perf_counter() - t
  _say(f"seed {seed} adapter: held-out KL {am['kl']:.3f}, top-1 {am['top1_agreement']:.3f}, Spearman "
       f"{am['spearman']:.3f}; harmless-weight split AUC {split_auc:.3f} (of the targets themselves "
       f"{res['adapter']['target_split_auc']:.3f}) ({T['adapter']:.0f} s)")

  # 6. best-of-n with the cached candidates
  t = time.perf_counter()
  gi = sh.gen_index()
  N, S = len(gi), c.n_samples
  z_sel = norm.apply(score(rm, sh.cand_f)).reshape(N, S, -1)
  z_eval = norm_e.apply(score(ev, sh.cand_f)).reshape(N, S, -1)
  w_star_e = held_t_e[gi]  # the utility's weights: eval RM on the held-out chosen response
  grid = fixed_grid(c.grid_step)
  settings = {"PRO": w_held[gi], "w* (RM target)": held_t[gi], "uniform": np.full((N, 2), 0.5)}
  settings.update({wname(w): np.broadcast_to(w, (N, 2)) for w in grid})
  U, picks = {}, {}
  for name, w in settings.items():
    picks[name] = best_of_n(z_sel, np.asarray(w))
    U[name] = utility(w_star_e, z_eval[np.arange(N), picks[name]])
  U["random candidate (mean)"] = np.mean([utility(w_star_e, z_eval[:, j]) for j in range(S)], axis=0)
  U["oracle best-of-n (eval RM)"] = np.max([utility(w_star_e, z_eval[:, j]) for j in range(S)], axis=0)
  fixed_names = [wname(w) for w in grid]
  best = max(fixed_names, key=lambda n: U[n].mean())
  boot = paired_bootstrap(U["PRO"], np.stack([U[n] for n in fixed_names], 1), c.bootstrap, seed)
  res["best_of_n"] = {"num_prompts": N, "n": S, "adapter_weights": w_held[gi].tolist(),
                      "utility": {k: float(v.mean()) for k, v in U.items()},
                      "utility_sem": {k: float(v.std(ddof=1) / math.sqrt(N)) for k, v in U.items()},
                      "pro_win_rate_vs_best_fixed": win_rate(U["PRO"], U[best]),
                      "best_fixed": best, "pro_minus_best_fixed": boot,
                      "per_prompt_utility": {k: v.tolist() for k, v in U.items()}}
  files_gen = np.asarray([x["file"] for x in rows["gen"]])
  res["best_of_n"]["utility_by_file"] = {k: {f: float(v[files_gen == f].mean()) for f in OBJECTIVES}
                                         for k, v in U.items()}
  diff = [i for i in range(N) if picks["PRO"][i] != picks[best][i]][:3]
  res["best_of_n"]["samples"] = [{"file": rows["gen"][i]["file"],
                                  "prompt": _dialogue(rows["gen"][i]["prompt"]),
                                  "adapter_weights": np.round(w_held[gi][i], 3).tolist(),
                                  "PRO": sh.cands[i][picks["PRO"][i]], "best_fixed": sh.cands[i][picks[best][i]],
                                  "U_PRO": float(U["PRO"][i]), "U_best_fixed": float(U[best][i])} for i in diff]
  T["best_of_n"] = time.perf_counter() - t
  _say(f"seed {seed} best-of-{S} on {N} held-out prompts: U(PRO) {U['PRO'].mean():.3f}, best fixed {best} "
       f"{U[best].mean():.3f}, uniform {U['uniform'].mean():.3f}, w* {U['w* (RM target)'].mean():.3f}; PRO - best "
       f"fixed {boot['delta']:+.3f} [{boot['lo']:+.3f}, {boot['hi']:+.3f}] ({T['best_of_n']:.0f} s)")

  # what the policy stage needs later (it runs after every seed's inference results)
  np.savez(os.path.join(out_dir, "state.npz"), rm_kernel=np.asarray(rm["head"]["kernel"]),
           rm_bias=np.asarray(rm["head"]["bias"]), rm_mu=rm["mu"], rm_sd=rm["sd"],
           ev_kernel=np.asarray(ev["head"]["kernel"]), ev_bias=np.asarray(ev["head"]["bias"]), ev_mu=ev["mu"],
           ev_sd=ev["sd"], own_chosen=own["rm"]["chosen"], own_rejected=own["rm"]["rejected"], w_pro=w_held[gi],
           w_star_e=w_star_e)
  return res


def run_policy(sh: Shared, seed: int, out_dir: str, res: dict[str, Any], pdir: str) -> dict[str, Any]:
  """RiC-style weight-conditioned LoRA policy (best_of conditioning over the simplex) trained with the
  engine on half A's chosen / rejected responses (scored by the seed's RM); evaluated with the
  adapter's weights vs the fixed grid on held-out prompts, scored by the seed's eval RM."""
  import jax
  import jax.numpy as jnp
  from pro_jax.data.pipeline import Pipeline, PipelineConfig
  from pro_jax.models import LoRAConfig, Transformer
  from pro_jax.models.sources import load_source
  from pro_jax.stages.evaluate import GenerationConfig, generate_texts
  from pro_jax.pro.metrics import utility, win_rate
  from pro_jax.pro.normalize import NormStats
  from pro_jax.stages.policy import best_of_examples, condition_prompt, sft_task
  from pro_jax.stages.stage import StageInputs, engine_config
  from pro_jax.train.trainer import train
  st = np.load(os.path.join(out_dir, "state.npz"))
  norm, norm_e = NormStats.from_dict(res["norm"]["rm"]), NormStats.from_dict(res["norm"]["eval_rm"])
  ev = {"head": {"kernel": st["ev_kernel"], "bias": st["ev_bias"]}, "mu": st["ev_mu"], "sd": st["ev_sd"]}
  z_rm, w_pro, w_star_e = (st["own_chosen"], st["own_rejected"]), st["w_pro"], st["w_star_e"]
  c, rows = sh.c, sh.rows
  half = rows["rm_a"]
  z = [np.stack([norm.apply(z_rm[0][i]), norm.apply(z_rm[1][i])]) for i in range(len(half))]
  examples = [dict(x, responses=[x["chosen"], x["rejected"]]) for x in half]
  data = best_of_examples(examples, z, OBJECTIVES, c.policy_samples, seed=seed,
                          concentration=c.policy_concentration)
  lora = LoRAConfig(rank=c.lora_rank, alpha=c.lora_alpha, targets=tuple(c.lora_targets.split(",")))
  mcfg = sh.cfg.replace(lora=lora)
  L_prompt = c.max_prompt_len + c.policy_prompt_extra  # the weight text adds ~15 tokens (cut from the left)
  pc = PipelineConfig(kind="sequence", batch_size=c.policy_batch, max_prompt_len=L_prompt,
                      max_response_len=c.max_response_len, bucket_multiple=8, template="auto", strict=True,
                      shuffle=True, seed=seed, num_epochs=None, static_shapes=True)
  pipe = Pipeline(data, sh.tok, pc, name="policy/best_of")
  ecfg = engine_config(**{"seed": seed, "total_steps": c.policy_steps, "batch_size": c.policy_batch,
                          "trainable": "lora", "model.lora.rank": c.lora_rank, "model.lora.alpha": c.lora_alpha,
                          "model.lora.targets": tuple(c.lora_targets.split(",")), "optim.lr": c.policy_lr,
                          "optim.warmup_steps": min(4, c.policy_steps), "optim.weight_decay": 0.0,
                          "checkpoint.every_steps": c.policy_steps, "checkpoint.keep": 1,
                          "log.every_steps": max(1, c.policy_steps // 4), "log.progress": False,
                          "log.tensorboard": False})
  task = sft_task(ecfg, mcfg, pipe.batch_spec(), name="policy",
                  inputs=StageInputs(init=sh.params, data=pipe, extra={"objectives": list(OBJECTIVES)}))
  result = train(ecfg, pdir, task, existing="auto")
  bb = load_source(f"checkpoint:{pdir}")  # LoRA merged
  pol_model = Transformer(bb.config)
  pi = sh.pol_index()
  N = len(pi)
  prompts = [rows["gen"][i]["prompt"] for i in pi]
  grid = fixed_grid(c.policy_grid_step)
  settings = {"PRO": w_pro[pi]}
  settings.update({wname(w): np.broadcast_to(w, (N, 2)) for w in grid})
  names = list(settings)
  cond = [condition_prompt(p, w, OBJECTIVES) for n in names for p, w in zip(prompts, settings[n])]
  gen = GenerationConfig(max_prompt_len=L_prompt, max_new_tokens=c.max_response_len - 1, batch_size=c.gen_batch,
                         greedy=False, temperature=c.temperature, top_p=c.top_p, seed=seed, template="auto")
  # uncommitted, as the GGUF-loaded base's: the restored (committed) arrays would lower `generate` with
  # other input shardings and compile it again (same shapes and config as the candidates' when
  # policy_prompt_extra = 0 and the row counts fit one gen_batch)
  params = jax.tree.map(jnp.asarray, jax.device_get(bb.params))
  texts, _, _ = generate_texts(pol_model, {"params": params}, sh.tok, cond, gen)
  # scored as answers to the plain (unconditioned) prompt by the eval RM
  z_e = norm_e.apply(score(ev, sh.response_features([p for _ in names for p in prompts], texts)))
  U = {n: utility(w_star_e[pi], z_e[j * N:(j + 1) * N]) for j, n in enumerate(names)}
  fixed = names[1:]
  best = max(fixed, key=lambda n: U[n].mean())
  boot = paired_bootstrap(U["PRO"], np.stack([U[n] for n in fixed], 1), c.bootstrap, seed)
  by = {n: texts[j * N:(j + 1) * N] for j, n in enumerate(names)}
  return {"num_prompts": N, "steps": int(result.step), "train_rows": len(data),
          "utility": {n: float(u.mean()) for n, u in U.items()},
          "normalized_eval": {n: np.asarray(z_e[j * N:(j + 1) * N]).mean(0).tolist() for j, n in enumerate(names)},
          "best_fixed": best, "pro_minus_best_fixed": boot, "pro_win_rate_vs_best_fixed": win_rate(U["PRO"], U[best]),
          "per_prompt_utility": {n: u.tolist() for n, u in U.items()},
          "samples": [{"file": rows["gen"][pi[i]]["file"], "prompt": _dialogue(prompts[i]),
                       "adapter_weights": np.round(settings["PRO"][i], 2).tolist(), "PRO": by["PRO"][i],
                       "best_fixed": by[best][i], "fixed[1.00,0.00]": by.get("fixed[1.00,0.00]", [""] * N)[i],
                       "fixed[0.00,1.00]": by.get("fixed[0.00,1.00]", [""] * N)[i]} for i in range(min(3, N))]}


# ---------------------------------------------------------------------------------------------
# The run and its report


def _seeds(spec: str) -> list[int]:
  return [int(s) for s in str(spec).split(",") if s.strip() != ""]


def run(workdir: str, data_dir: str, config: SmolConfig | None = None) -> dict[str, Any]:
  """Run the experiment (resumable: the shared cache and finished seeds are reused); returns the
  report dict (also WORKDIR/report.json, report.md, plots)."""
  c = config or SmolConfig()
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  data_dir = pathlib.Path(data_dir).expanduser()
  timings: dict[str, float] = {}
  sh = Shared(workdir, data_dir, c, timings)
  seeds, pol_seeds = _seeds(c.seeds), _seeds(c.policy_seeds)
  # result keys: fields added later count only when set off their default (earlier runs stay reusable)
  cfg = {k: v for k, v in dataclasses.asdict(c).items() if _LATER_FIELDS.get(k, object()) != v}
  main_key = _key({k: v for k, v in cfg.items() if not k.startswith(("policy_", "lora_"))})
  per_seed = {}
  for s in seeds:  # inference results of every seed first (cheap), then the trained policies
    out_dir = os.path.join(workdir, f"seed{s}-{main_key}")
    path = os.path.join(out_dir, "result.json")
    if os.path.exists(path):
      with open(path) as f:
        per_seed[s] = json.load(f)
      _say(f"seed {s}: reusing {path}")
      continue
    t = time.perf_counter()
    res = run_seed(sh, s, out_dir)
    res["timings_s"]["total"] = time.perf_counter() - t
    _write_json(path, res)
    per_seed[s] = res
  pol_key = _key(cfg)
  for s in pol_seeds:
    if s not in per_seed:
      raise ValueError(f"policy seed {s} is not one of the seeds {seeds}")
    out_dir = os.path.join(workdir, f"seed{s}-{main_key}")
    path = os.path.join(out_dir, f"policy-{pol_key}.json")
    if os.path.exists(path):
      with open(path) as f:
        per_seed[s]["policy"] = json.load(f)
      _say(f"seed {s}: reusing {path}")
      continue
    t = time.perf_counter()
    pol = run_policy(sh, s, out_dir, per_seed[s], os.path.join(out_dir, f"policy-{pol_key}"))
    pol["seconds"] = time.perf_counter() - t
    _write_json(path, pol)
    per_seed[s]["policy"] = pol
    per_seed[s]["timings_s"]["policy"] = pol["seconds"]
    _say(f"seed {s} policy ({c.policy_steps} LoRA steps, {len(pol['utility'])} settings x {pol['num_prompts']} "
         f"prompts): U(PRO) {pol['utility']['PRO']:.3f}, best fixed {pol['best_fixed']} "
         f"{pol['utility'][pol['best_fixed']]:.3f}; PRO - best fixed {_fmt_iv(pol['pro_minus_best_fixed'])} "
         f"({pol['seconds']:.0f} s)")
  per_seed = [per_seed[s] for s in seeds]
  timings["total"] = time.perf_counter() - t0
  report = summarize(c, sh, per_seed, timings)
  write_report(report, workdir)
  _say(f"done in {timings['total']:.0f} s: {os.path.join(workdir, 'report.md')}")
  return report


_LATER_FIELDS = {"feature_bucket": 32, "policy_prompt_extra": 16}  # field: its default


def _key(d: dict) -> str:
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, default=float)
  os.replace(path + ".tmp", path)


def summarize(c: SmolConfig, sh: Shared, per_seed: list[dict], timings: dict[str, float]) -> dict[str, Any]:
  acc = lambda k, o: [r["rm"][k]["held_out_accuracy"][o] for r in per_seed]
  targets = {
      **{f"rm_accuracy_{o} >= 0.65": {"values": acc("rm", o), "met": all(v >= 0.65 for v in acc("rm", o))}
         for o in OBJECTIVES},
      "adapter_split_auc >= 0.85": {"values": [r["adapter"]["split_auc"] for r in per_seed],
                                    "met": all(r["adapter"]["split_auc"] >= 0.85 for r in per_seed)},
      "best_of_n: PRO - best fixed > 0 with 95% interval above 0, every seed": {
          "values": [r["best_of_n"]["pro_minus_best_fixed"] for r in per_seed],
          "met": len(per_seed) >= 3 and all(r["best_of_n"]["pro_minus_best_fixed"]["lo"] > 0 for r in per_seed)},
  }
  pol = [r for r in per_seed if "policy" in r]
  if pol:
    targets["policy: PRO above the best fixed vector"] = {
        "values": [r["policy"]["pro_minus_best_fixed"] for r in pol],
        "met": all(r["policy"]["pro_minus_best_fixed"]["delta"] > 0 for r in pol)}
  return {"config": dataclasses.asdict(c), "split": sh.split,
          "rows_used": {k: len(v) for k, v in sh.rows.items()},
          "model": {"source": c.model, "params": sh.cfg.num_params(), "n_layers": sh.cfg.n_layers,
                    "mid_layer": sh.bb.mid},
          "timings_s": {"shared": {k: round(v, 1) for k, v in timings.items()},
                        "per_seed": {r["seed"]: {k: round(v, 1) for k, v in r["timings_s"].items()} for r in per_seed}},
          "seeds": per_seed, "targets": targets,
          "cpu": _cpu()}


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    fam = next((l.split(":")[1].strip() for l in info.splitlines() if l.startswith("cpu family")), "?")
    name = next((l.split(":")[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    return f"{name} (cpu family {fam}), {os.cpu_count()} cores"
  except OSError:
    return "unknown"


def _fmt_iv(b: dict) -> str:
  return f"{b['delta']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}]"


def report_markdown(rep: dict[str, Any]) -> str:
  c, seeds = rep["config"], rep["seeds"]
  md = [f"# PRO on SmolLM2-135M-Instruct (GGUF) and real HH-RLHF", "",
        f"Model `{c['model']}` ({rep['model']['params']:,} params, frozen; its features computed once and cached; "
        f"each reward model = 2 linear heads on them). Data: HH-RLHF "
        f"helpful-base + harmless-base test files, split by first-turn group (0 overlap): "
        + ", ".join(f"{o}: {s['train']} train / {s['held_out']} held-out pairs" for o, s in rep["split"].items())
        + f"; used per file: {c['train_pairs_per_file']} train pairs (halves: RM / eval RM), "
        f"{c['held_pairs_per_file']} held-out pairs, {c['gen_prompts_per_file']} best-of-n prompts, "
        f"{c['policy_prompts_per_file']} policy prompts. Prompts <= {c['max_prompt_len']} tokens (ChatML), responses "
        f"<= {c['max_response_len']} tokens. CPU: {rep['cpu']}.", "",
        "U = sum_k w*_E,k(x) r~_E,k(x, y): the EVALUATION reward model (other half of the training pairs, other "
        "seed) scores every selected / generated response, and its own w*_E(x) = softmax(r~_E(x, y_w)/tau) of the "
        "held-out chosen response weighs the objectives. Intervals: paired bootstrap 95% of PRO minus the best "
        "fixed vector, the best fixed vector re-picked in each resample.", "",
        "## Targets", "", "| target | values (per seed) | met |", "|---|---|---|"]
  for name, t in rep["targets"].items():
    vals = ", ".join(_fmt_iv(v) if isinstance(v, dict) else f"{v:.3f}" for v in t["values"])
    md.append(f"| {name} | {vals} | {'yes' if t['met'] else 'no'} |")
  md += ["", "## Reward models and adapter (held out)", "",
         "| seed | RM helpful | RM harmless | eval RM helpful | eval RM harmless | adapter KL | top-1 | Spearman | "
         "split AUC (harmless weight) | mean adapter w (helpful-base) | mean adapter w (harmless-base) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in seeds:
    a, e, ad = r["rm"]["rm"]["held_out_accuracy"], r["rm"]["eval_rm"]["held_out_accuracy"], r["adapter"]
    mw = ad["mean_weight_held_out"]
    md.append(f"| {r['seed']} | {a['helpful']:.3f} | {a['harmless']:.3f} | {e['helpful']:.3f} | {e['harmless']:.3f} | "
              f"{ad['kl']:.3f} | {ad['top1_agreement']:.3f} | {ad['spearman']:.3f} | {ad['split_auc']:.3f} | "
              f"{np.round(mw['helpful'], 3).tolist()} | {np.round(mw['harmless'], 3).tolist()} |")
  md += ["", f"## PRO at inference: best-of-{c['n_samples']} (candidates sampled once from the instruct model)", "",
         "| seed | U PRO | U best fixed (which) | U uniform | U w* (RM target) | U random candidate | "
         "PRO - best fixed [95%] | PRO win rate vs best fixed |", "|---|---|---|---|---|---|---|---|"]
  for r in seeds:
    b = r["best_of_n"]
    u = b["utility"]
    md.append(f"| {r['seed']} | {u['PRO']:.3f} | {u[b['best_fixed']]:.3f} ({b['best_fixed']}) | {u['uniform']:.3f} | "
              f"{u['w* (RM target)']:.3f} | {u['random candidate (mean)']:.3f} | {_fmt_iv(b['pro_minus_best_fixed'])} | "
              f"{b['pro_win_rate_vs_best_fixed']:.2f} |")
  pol = [r for r in seeds if "policy" in r]
  if pol:
    md += ["", f"## PRO in training: weight-conditioned LoRA policy (RiC-style, best_of conditioning, "
               f"{c['policy_steps']} steps, rank {c['lora_rank']})", "",
           "| seed | U PRO | U best fixed (which) | U of each fixed vector | PRO - best fixed [95%] | win rate |",
           "|---|---|---|---|---|---|"]
    for r in pol:
      p = r["policy"]
      u = p["utility"]
      fx = ", ".join(f"{n[6:-1]}: {v:.3f}" for n, v in u.items() if n != "PRO")
      md.append(f"| {r['seed']} | {u['PRO']:.3f} | {u[p['best_fixed']]:.3f} ({p['best_fixed']}) | {fx} | "
                f"{_fmt_iv(p['pro_minus_best_fixed'])} | {p['pro_win_rate_vs_best_fixed']:.2f} |")
  md += ["", "## Timings (s)", "", "shared (once): " + ", ".join(f"{k} {v}" for k, v in rep["timings_s"]["shared"].items()),
         ""]
  for s, t in rep["timings_s"]["per_seed"].items():
    md.append(f"- seed {s}: " + ", ".join(f"{k} {v}" for k, v in t.items()))
  md += ["", "## Generations side by side (seed %d)" % seeds[0]["seed"], ""]
  for smp in seeds[0]["best_of_n"]["samples"]:
    md += [f"**best-of-n, {smp['file']}-base prompt** (adapter w = {smp['adapter_weights']}): {_q(smp['prompt'])}", "",
           f"- PRO pick (U {smp['U_PRO']:.2f}): {_q(smp['PRO'])}",
           f"- best fixed pick (U {smp['U_best_fixed']:.2f}): {_q(smp['best_fixed'])}", ""]
  if pol:
    for smp in pol[0]["policy"]["samples"]:
      md += [f"**policy, {smp['file']}-base prompt** (adapter w = {smp['adapter_weights']}): {_q(smp['prompt'])}", "",
             f"- PRO weights: {_q(smp['PRO'])}", f"- best fixed: {_q(smp['best_fixed'])}",
             f"- w = [1, 0] (helpful only): {_q(smp['fixed[1.00,0.00]'])}",
             f"- w = [0, 1] (harmless only): {_q(smp['fixed[0.00,1.00]'])}", ""]
  md += ["![best-of-n utility](utility_best_of_n.png)", ""]
  if pol:
    md += ["![policy utility](utility_policy.png)", ""]
  return "\n".join(md) + "\n"


def _dialogue(prompt: list[dict], turns: int = 3) -> str:
  """The last `turns` messages as 'Human: ... Assistant: ...' text (for the report)."""
  return " ".join(("Human: " if m["role"] == "user" else "Assistant: ") + str(m["content"]) for m in prompt[-turns:])


def _q(text: str, n: int = 300) -> str:
  t = " ".join(str(text).split())
  return "\"" + (t if len(t) <= n else t[:n] + " ...") + "\""


def _plot(rep: dict[str, Any], key: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, r in enumerate(x for x in rep["seeds"] if key in x):
    u = r[key]["utility"]
    fixed = sorted((float(n[6:-1].split(",")[0]), v) for n, v in u.items() if n.startswith("fixed["))
    col = f"C{i}"
    ax.plot([f for f, _ in fixed], [v for _, v in fixed], "o-", color=col, ms=3, label=f"fixed w, seed {r['seed']}")
    ax.axhline(u["PRO"], color=col, ls="--", label=f"PRO (adapter w), seed {r['seed']}")
  ax.set_xlabel("fixed weight on 'helpful' (1 - weight on 'harmless')")
  ax.set_ylabel("mean utility U (eval RM)")
  ax.set_title("best-of-n selection" if key == "best_of_n" else "weight-conditioned policy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(rep: dict[str, Any], workdir: str) -> None:
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(rep, f, indent=1, default=float)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report_markdown(rep))
  _plot(rep, "best_of_n", os.path.join(workdir, "utility_best_of_n.png"))
  if any("policy" in r for r in rep["seeds"]):
    _plot(rep, "policy", os.path.join(workdir, "utility_policy.png"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  repo = pathlib.Path(__file__).resolve().parents[1]
  p.add_argument("--data-dir", default=os.environ.get("PRO_JAX_SHARED_DATA", str(repo.parent / "shared" / "data")))
  p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named size preset (flags still override)")
  for f in dataclasses.fields(SmolConfig):
    p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
  args = p.parse_args(argv)
  base = dataclasses.asdict(SmolConfig())
  base.update(PRESETS.get(args.preset, {}) if args.preset else {})
  base.update({f.name: getattr(args, f.name) for f in dataclasses.fields(SmolConfig) if getattr(args, f.name) is not None})
  return run(args.workdir, args.data_dir, SmolConfig(**base))


if __name__ == "__main__":
  main(sys.argv[1:])
