"""Stage 5: policy training with prompt-aware weights w(x), as loss plug-ins for the engine's step.

Every policy loss reads its per-prompt weights from the batch field ``weights`` [B, K], filled
before training from ``weights_source`` (`resolve_example_weights`): ``target`` (w* from the
preferred response), ``adapter`` (f_psi(x)), ``fixed:[...]`` or ``uniform``. The weights are
constants (stop-gradient inside the losses), so where they come from changes nothing in the step.

Losses (`policy_loss(kind, ...)`):

* ``sft``: next-token NLL on responses (token mean);
* ``ric``: the same on weight-conditioned prompts (RiC-style: the prompt carries w as text,
  `condition_prompt`); build its data with `ric_examples`;
* ``dpo``: plain DPO (TRL's formula), ignoring the weights (the single-objective baseline);
* ``wdpo``: weighted multi-objective DPO, signs s_k from the pair's normalized rewards
  (``reward_chosen`` / ``reward_rejected`` fields);
* ``modpo``: MODPO, objective 0 through the DPO implicit reward, margins r~_k(y_w) - r~_k(y_l), k>=1.

DPO-type losses run chosen and rejected through the policy as one [2B, L] batch, and the frozen
reference the same way (`frozen["ref"]`), unless the reference log-probs were precomputed into the
batch (``ref_chosen_logp`` / ``ref_rejected_logp``, `precompute_reference_logps`): the reference is
frozen, so that is exact and saves its forward pass every step. With LoRA the reference is the base
model itself (the policy's `params` without its `lora`), so no second copy of the weights is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.data.tokenize import normalize_messages
from pro_jax.models import ModelConfig, Transformer, abstract_variables, init_variables, logical_axes
from pro_jax.pro import losses, ops
from pro_jax.pro.weights import (WeightsSource, format_rewards_text, format_weights_text, parse_weights_source,
                                  parse_weights_text)
from pro_jax.stages.stage import StageInputs, make_task, trained_passes
from pro_jax.train.trainer import Task

POLICY_LOSSES = ("sft", "ric", "dpo", "wdpo", "modpo")
DPO_TYPE = ("dpo", "wdpo", "modpo")


def _cat(batch: dict, a: str, b: str) -> jax.Array:
  return jnp.concatenate([batch[a], batch[b]], axis=0)


def pair_logps(model: Transformer, variables: Any, batch: dict,
               response_window: int | None = None, average: bool = False) -> tuple[jax.Array, jax.Array]:
  """Summed (`average`: length-averaged, as TRL feeds IPO) response log-probs (chosen_B, rejected_B),
  one forward over [chosen; rejected].

  response_window: the longest response (tokens, EOS included; the pipeline's max_response_len).
  Given, the LM head runs only on each row's response window instead of all L positions (the
  prompt's logits are never used); a row whose response does not fit gives NaN. None: every position.
  """
  tokens = _cat(batch, "chosen_tokens", "rejected_tokens")
  mask = _cat(batch, "chosen_mask", "rejected_mask")
  loss_mask = _cat(batch, "chosen_loss_mask", "rejected_loss_mask")
  if response_window is None or response_window >= tokens.shape[1] - 1:
    logits = model.apply(variables, tokens, mask).logits
    logp_2B = ops.sequence_logprob(logits, tokens, loss_mask, average=average)
  else:
    positions, targets, window_mask = ops.response_window(tokens, loss_mask, response_window)
    logits = model.apply(variables, tokens, mask, logit_positions_BxR=positions).logits
    logp_2B = ops.window_sequence_logprob(logits, targets, window_mask, loss_mask, average=average)
  return jnp.split(logp_2B, 2)


def policy_loss(kind: str, model: Transformer, *, ref_model: Transformer | None = None, beta: float = 0.1,
                ref_key: str = "ref", label_smoothing: float = 0.0, dpo_loss_type: str = "sigmoid",
                modpo_w0_min: float = 1e-2, response_window: int | None = None) -> Callable:
  """The loss plug-in `(params, frozen, batch, rng) -> (loss, metrics)` for `kind` (see module doc).

  ref_key: where the reference variables are: "ref" (frozen["ref"]), "base" (the policy's own base
    params, for LoRA policies) or "batch" (precomputed `ref_chosen_logp` / `ref_rejected_logp`).
    response_window: DPO-type losses: the longest response in tokens (see `pair_logps`); the LM
      head then runs on the responses only.
  """
  if kind not in POLICY_LOSSES:
    raise ValueError(f"policy loss must be one of {POLICY_LOSSES}, got {kind!r}")

  if kind in ("sft", "ric"):

    soft = bool(model.config.weight_tokens)

    def sft_fn(params, frozen, batch, rng):
      del frozen
      deterministic = model.deterministic
      out = model.apply(params, batch["tokens"], batch["mask"], weights_BxK=batch["weights"] if soft else None,
                        rngs={"dropout": rng} if not deterministic else None)
      loss, metrics = losses.sft(out.logits, batch["tokens"], batch["loss_mask"])
      metrics = dict(metrics)
      metrics["loss_weight"] = metrics["tokens"]
      return loss, metrics

    return sft_fn

  if ref_key not in ("ref", "base", "batch"):
    raise ValueError(f"ref_key must be 'ref', 'base' or 'batch', got {ref_key!r}")
  if ref_model is None:  # the reference is the policy's architecture without LoRA (its base for ref_key="base")
    ref_model = model if model.config.lora is None else Transformer(model.config.replace(lora=None))
  if dpo_loss_type not in losses.DPO_LOSS_TYPES:
    raise ValueError(f"dpo_loss_type must be one of {losses.DPO_LOSS_TYPES}, got {dpo_loss_type!r}")
  # IPO takes length-averaged log-probs (TRL); the other losses summed ones
  average = kind == "dpo" and dpo_loss_type == "ipo"

  def dpo_fn(params, frozen, batch, rng):
    del rng
    policy_chosen_logp_B, policy_rejected_logp_B = pair_logps(model, params, batch, response_window, average)
    if ref_key == "batch":
      ref_chosen_logp_B, ref_rejected_logp_B = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
    else:
      ref_vars = frozen["ref"] if ref_key == "ref" else {"params": params["params"]}
      ref_chosen_logp_B, ref_rejected_logp_B = pair_logps(ref_model, ref_vars, batch, response_window, average)
    ref_chosen_logp_B = jax.lax.stop_gradient(ref_chosen_logp_B)
    ref_rejected_logp_B = jax.lax.stop_gradient(ref_rejected_logp_B)
    chosen_logratio_B = policy_chosen_logp_B - ref_chosen_logp_B
    rejected_logratio_B = policy_rejected_logp_B - ref_rejected_logp_B
    real_B = (batch["example_id"] >= 0).astype(jnp.float32)
    if kind == "dpo":
      loss, metrics = losses.dpo(policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B,
                                 beta, label_smoothing, dpo_loss_type, mask_B=real_B)
    elif kind == "wdpo":
      signs_BxK = losses.pair_signs(batch["reward_chosen"], batch["reward_rejected"])
      loss, metrics = losses.weighted_mo_dpo(chosen_logratio_B, rejected_logratio_B, signs_BxK, batch["weights"],
                                             beta, mask_B=real_B)
    else:
      margins_BxK = batch["reward_chosen"] - batch["reward_rejected"]
      # the DPO term is fit on objective 0's own pairs: pair_objectives[:, 0] masks / orients the rows
      loss, metrics = losses.modpo(chosen_logratio_B, rejected_logratio_B, batch["weights"], margins_BxK, beta,
                                   modpo_w0_min, mask_B=real_B, label0_B=batch["pair_objectives"][:, 0])
    metrics = dict(metrics)
    metrics["logratio/chosen"] = ops.masked_mean(chosen_logratio_B, real_B)
    metrics["logratio/rejected"] = ops.masked_mean(rejected_logratio_B, real_B)
    metrics["loss_weight"] = metrics["pairs"] if kind == "modpo" else real_B.sum()
    return loss, metrics

  return dpo_fn


def precompute_reference_logps(ref_model: Transformer, ref_variables: Any, pipeline: Any,
                               response_window: int | None = None, average: bool = False) -> dict[int, tuple]:
  """example_id -> (ref log p(chosen), ref log p(rejected)) over one pass of a pair pipeline
  (`average`: length-averaged, for IPO)."""
  fn = jax.jit(lambda variables, batch: pair_logps(ref_model, variables, batch, response_window, average))
  out = {}
  for batch in pipeline.iterator():
    ref_chosen_logp_B, ref_rejected_logp_B = jax.device_get(fn(ref_variables, batch))
    for i, c, r in zip(batch["example_id"], ref_chosen_logp_B, ref_rejected_logp_B):
      if i >= 0:
        out[int(i)] = (float(c), float(r))
  return out


# ---------------------------------------------------------------------------------------------
# The task builders (the pipeline with weights and data; `pro-jax aot` with abstract shapes)


def sft_task(ecfg: Any, mcfg: ModelConfig, spec: dict, *, name: str = "sft",
             inputs: StageInputs | None = None) -> Task:
  """Next-token loss on sequence batches: stage sft, and the sft / ric (weight-conditioned) policies."""
  model = Transformer(mcfg)
  B, L = spec["tokens"].shape
  return make_task(name, policy_loss("sft", model), abstract_variables(model), logical_axes(model), spec,
                   init=lambda rng: init_variables(model, rng), model_config=mcfg, tokens_per_step=B * L,
                   flops_per_step=trained_passes(mcfg, ecfg.trainable) * mcfg.flops_per_token(L) * B * L,
                   inputs=inputs)


def dpo_task(ecfg: Any, mcfg: ModelConfig, spec: dict, kind: str, *, beta: float, ref_key: str,
             ref_dtype: str = "float32", ref_config: ModelConfig | None = None, response_window: int | None = None,
             name: str = "policy", inputs: StageInputs | None = None, dpo_loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> Task:
  """A DPO-type policy (dpo / wdpo / modpo) on pair batches; the reference as `ref_key` says (see
  `policy_loss`): "ref" = a frozen input (`ref_config`, default the policy without LoRA, weights
  in `ref_dtype`), "base" = the LoRA policy's own base, "batch" = precomputed log-probs.
  `dpo_loss_type` / `label_smoothing`: TRL's DPO loss (sigmoid / ipo / hinge) and cDPO smoothing."""
  model = Transformer(mcfg)
  frozen = {}
  if ref_key == "ref":
    frozen["ref"] = (Transformer(ref_config or mcfg.replace(lora=None)), ref_dtype)
  B, L = spec["chosen_tokens"].shape
  fwd = mcfg.flops_per_token(L)
  flops = trained_passes(mcfg, ecfg.trainable) * fwd * 2 * B * L + (0.0 if ref_key == "batch" else fwd * 2 * B * L)
  loss = policy_loss(kind, model, beta=beta, ref_key=ref_key, response_window=response_window,
                     dpo_loss_type=dpo_loss_type, label_smoothing=label_smoothing)
  return make_task(name, loss, abstract_variables(model), logical_axes(model), spec,
                   init=lambda rng: init_variables(model, rng), frozen=frozen, model_config=mcfg,
                   tokens_per_step=2 * B * L, flops_per_step=flops, inputs=inputs)


# ---------------------------------------------------------------------------------------------
# Weights and weight-conditioned data


def resolve_example_weights(source: str | WeightsSource, num_examples: int, num_objectives: int, *,
                            targets_NxK: np.ndarray | None = None,
                            adapter_fn: Callable[[], np.ndarray] | None = None) -> np.ndarray:
  """Per-example weights [N, K] for `weights_source` (target / adapter / fixed:[...] / uniform)."""
  src = parse_weights_source(source, num_objectives) if isinstance(source, str) else source
  if src.kind == "target":
    if targets_NxK is None:
      raise ValueError("weights_source='target' needs the adapter targets w* (a preferred response per prompt)")
    w = np.asarray(targets_NxK, np.float32)
  elif src.kind == "adapter":
    if adapter_fn is None:
      raise ValueError("weights_source='adapter' needs a trained preference adapter")
    w = np.asarray(adapter_fn(), np.float32)
  elif src.kind == "uniform":
    w = np.full((num_examples, num_objectives), 1.0 / num_objectives, np.float32)
  else:
    w = np.broadcast_to(np.asarray(src.values, np.float32), (num_examples, num_objectives)).copy()
  if w.shape != (num_examples, num_objectives):
    raise ValueError(f"weights_source={source}: got weights of shape {w.shape}, expected "
                     f"{(num_examples, num_objectives)}")
  return w


def condition_prompt(prompt: Any, weights: Sequence[float], objectives: Sequence[str], decimals: int = 1, *,
                     soft_placeholder: str = "", soft_tokens: int = 0, text: str | None = None) -> list[dict]:
  """RiC-style conditioning of the last user turn (a new message list is returned).

  Text conditioning (default): the weight text "<w> concise 0.7 ... </w>" is appended. Soft
  conditioning (`soft_tokens` > 0): `soft_tokens` copies of `soft_placeholder` (a single-token
  string of the tokenizer) are appended instead; the model adds w . weight_embed[:, j] to the j-th
  (ModelConfig.weight_tokens), so the weights themselves go to the model as `weights_BxK`.
  `text` given: that text is appended instead (e.g. RiC's reward text, `format_rewards_text`).
  """
  msgs = [dict(m) for m in normalize_messages(prompt)]
  if text is not None:
    pass
  elif soft_tokens:
    if not soft_placeholder:
      raise ValueError("soft conditioning needs the tokenizer's placeholder token string")
    text = " ".join([soft_placeholder] * soft_tokens)
  else:
    text = format_weights_text(weights, objectives, decimals)
  for m in reversed(msgs):
    if m["role"] == "user":
      m["content"] = f"{m['content']} {text}"
      break
  else:
    raise ValueError("condition_prompt: the prompt has no user turn")
  return msgs


def ric_examples(examples: Sequence[dict], response_weights: Sequence[np.ndarray], objectives: Sequence[str],
                 decimals: int = 1, *, soft_placeholder: str = "", soft_tokens: int = 0) -> list[dict]:
  """Weight-conditioned SFT data: one row per (example, response) with the prompt conditioned on that
  response's own w*(x, y) (`response_weights[i]` is [N_i, K] for example i's `responses`)."""
  out = []
  for ex, w_NxK in zip(examples, response_weights):
    for j, (resp, w) in enumerate(zip(ex["responses"], w_NxK)):
      out.append({"id": f"{ex['id']}#{j}", "source": ex["source"], "objectives": list(objectives),
                  "prompt": condition_prompt(ex["prompt"], w, objectives, decimals,
                                             soft_placeholder=soft_placeholder, soft_tokens=soft_tokens),
                  "chosen": resp, "rejected": "", "pair_objectives": [0.0] * len(objectives), "responses": [],
                  "scores": [], "score_mask": [], "weights": np.asarray(w, np.float32).tolist()})
  return out


def reward_conditioned_examples(examples: Sequence[dict], normalized_scores: Sequence[np.ndarray],
                                objectives: Sequence[str], decimals: int = 1) -> list[dict]:
  """RiC proper: one row per (example, response) with the prompt conditioned on that response's own
  normalized rewards r~(x, y) ("<r> name value ... </r>", rounded to `decimals`), as RiC's offline
  stage trains (`normalized_scores[i]` is [N_i, K] for example i's `responses`)."""
  out = []
  for ex, z_NxK in zip(examples, normalized_scores):
    for j, (resp, z) in enumerate(zip(ex["responses"], np.asarray(z_NxK, np.float64))):
      out.append({"id": f"{ex['id']}#r{j}", "source": ex["source"], "objectives": list(objectives),
                  "prompt": condition_prompt(ex["prompt"], z, objectives, text=format_rewards_text(z, objectives, decimals)),
                  "chosen": resp, "rejected": "", "pair_objectives": [0.0] * len(objectives), "responses": [],
                  "scores": [], "score_mask": [], "rewards": z.astype(np.float32).tolist()})
  return out


def best_of_examples(examples: Sequence[dict], normalized_scores: Sequence[np.ndarray], objectives: Sequence[str],
                     samples_per_example: int, seed: int = 0, decimals: int = 1,
                     concentration: float = 0.5, *, soft_placeholder: str = "", soft_tokens: int = 0) -> list[dict]:
  """Weight-conditioned SFT data covering the whole simplex ("best_of" conditioning).

  For each example, draw `samples_per_example` weight vectors w ~ Dirichlet(concentration) (< 1 puts
  more draws near the corners and edges, which fixed-weight grids ask for), round them as the
  prompt text will show them, and pair the prompt conditioned on w with the example's response that
  maximizes w . r~(x, y) (`normalized_scores[i]` is [N_i, K] for example i's `responses`). The policy
  thus learns what every point of the simplex asks for, including weights no single response's own
  w* reaches (the corners), so fixed-weight baselines are served as well as prompt-aware weights.
  """
  rng = np.random.default_rng(seed)
  K = len(objectives)
  out = []
  for ex, z_NxK in zip(examples, normalized_scores):
    z_NxK = np.asarray(z_NxK, np.float64)
    for j in range(samples_per_example):
      w = rng.dirichlet(np.full(K, concentration))
      # text conditioning shows rounded weights: pick the best response for what the policy will see
      w_shown = w if soft_tokens else parse_weights_text(format_weights_text(w, objectives, decimals), objectives)
      best = int(np.argmax(z_NxK @ w_shown))
      out.append({"id": f"{ex['id']}#w{j}", "source": ex["source"], "objectives": list(objectives),
                  "prompt": condition_prompt(ex["prompt"], w_shown, objectives, decimals,
                                             soft_placeholder=soft_placeholder, soft_tokens=soft_tokens),
                  "chosen": ex["responses"][best], "rejected": "", "pair_objectives": [0.0] * K,
                  "responses": [], "scores": [], "score_mask": [], "weights": np.asarray(w_shown, np.float32).tolist()})
  return out
