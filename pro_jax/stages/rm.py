"""Stage 1: multi-objective reward models (train, evaluate, load).

A multi-head reward model is a `Transformer` with ``head="score"`` and ``num_labels = K``: a shared
backbone and K linear heads read at the last real token. It is trained with the Bradley-Terry loss
per objective, masked where a pair does not speak for an objective:
``sum_k m_k * -log sigmoid(r_k(x, y_w) - r_k(x, y_l))`` (mean over present labels). Chosen and
rejected sequences go through the backbone as one concatenated [2B, L] batch.

    model, variables = train_reward_model(cfg, "runs/rm", train_examples, tokenizer,
                                          backbone_source="llama2c:stories260K.bin",
                                          objectives=["helpful", "harmless"],
                                          max_prompt_len=64, max_response_len=128)
    evaluate_reward_model(model, variables, held_out, tokenizer, objectives=[...], ...)
    scorer = load_reward_model("runs/rm")            # a RewardModelScorer: score(prompts, responses)

`pair_accuracy` is the RM's metric: per-objective accuracy on held-out pairs.

LoRA (``engine_cfg.trainable = "lora"``): the score head is new, so it must train too (PEFT's
``modules_to_save``): during training it lives in ``variables["lora"]["score"]``
(`pro_jax.models.heads`); `rm_variables` moves it back into ``"params"`` before every forward.
`load_reward_model` returns the LoRA-merged plain model.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from pro_jax.data import files
from pro_jax.data.pipeline import Pipeline, PipelineConfig
from pro_jax.data.tokenize import encode, normalize_messages
from pro_jax.models import LoRAConfig, ModelConfig, Transformer, abstract_variables, init_variables, logical_axes
from pro_jax.models.heads import head_to_lora, head_to_params
from pro_jax.models.inference import batched_apply
from pro_jax.models.lora import merge_lora
from pro_jax.models.sources import derive_config, load_source
from pro_jax.models.tokenizer import load_tokenizer
from pro_jax.pro.losses import bradley_terry_multi
from pro_jax.stages.scoring import RewardModelScorer, hf_reward_scorer  # noqa: F401  (re-exported)
from pro_jax.stages.stage import Layout, StageInputs, make_task, trained_passes
from pro_jax.train.checkpoint import load_checkpoint
from pro_jax.train.trainer import Task, raise_if_preempted, train

META_KEY = "reward_model"
TOKENIZER_DIR = "tokenizer"


def rm_variables(variables: Any) -> Any:
  """The model's variables with a LoRA-trained score head (``lora/score``) moved into ``params``."""
  return head_to_params(variables, "score")


def _to_training_layout(variables: Any) -> Any:
  """Under LoRA, move ``params/score`` into ``lora/score`` so the engine trains it (inverse: rm_variables)."""
  return head_to_lora(variables, "score")


TRAINING_LAYOUT = Layout(to_model=rm_variables, to_trained=_to_training_layout)


def _pair_scores(model: Transformer, variables: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
  scores_2BxK = model.apply(rm_variables(variables), tokens, mask).scores
  return jnp.split(scores_2BxK, 2)


def rm_loss(model: Transformer, objectives: Sequence[str]):
  """Plug-in loss: Bradley-Terry per objective on a pair batch (``pair_objectives`` holds each
  objective's oriented label: +1 chosen preferred, -1 rejected preferred, 0 none)."""

  def loss_fn(params: Any, frozen: Any, batch: dict, rng: jax.Array):
    del frozen, rng
    r_chosen_BxK, r_rejected_BxK = _pair_scores(model, params, batch)
    real_B = (batch["example_id"] >= 0).astype(jnp.float32)
    mask_BxK = batch["pair_objectives"] * real_B[:, None]
    loss, metrics = bradley_terry_multi(r_chosen_BxK, r_rejected_BxK, mask_BxK, objectives)
    metrics = dict(metrics)
    metrics["loss_weight"] = jnp.abs(mask_BxK).sum()
    return loss, metrics

  return loss_fn


def pair_accuracy(model: Transformer, variables: Any, pipeline: Pipeline,
                  objectives: Sequence[str]) -> dict[str, Any]:
  """Per-objective held-out accuracy over one pass of `pipeline`: for each pair labelled for objective
  k, head k scores the response the label prefers (chosen for +1, rejected for -1) strictly higher.

  Returns {"accuracy": {objective: acc}, "count": {objective: n_pairs}, "mean_accuracy": float}
  (the mean over objectives that have pairs). Multi-host: every process returns the totals over all
  hosts (the pipeline gives each host its rows of each batch).
  """
  fn = jax.jit(lambda variables, batch: _pair_scores(model, variables, batch))
  correct = np.zeros(len(objectives))
  count = np.zeros(len(objectives))
  for batch in pipeline.iterator():
    rc, rr = jax.device_get(fn(variables, batch))
    s = np.sign(batch["pair_objectives"]) * (batch["example_id"] >= 0)[:, None]
    correct += (((rc - rr) * s > 0) * np.abs(s)).sum(0)
    count += np.abs(s).sum(0)
  if jax.process_count() > 1:  # each host scored its rows of every batch: add the hosts' counts
    correct, count = multihost_utils.process_allgather(np.stack([correct, count])).sum(0)
  acc = {o: (float(c / n) if n else float("nan")) for o, c, n in zip(objectives, correct, count)}
  present = [a for a, n in zip(acc.values(), count) if n]
  return {"accuracy": acc, "count": {o: int(n) for o, n in zip(objectives, count)},
          "mean_accuracy": float(np.mean(present)) if present else float("nan")}


def score_sequences(model: Transformer, variables: Any, tokens: np.ndarray, mask: np.ndarray,
                    batch_size: int = 64) -> np.ndarray:
  """Scores [N, K] of right-padded sequences, in fixed-size jitted batches."""
  fn = jax.jit(lambda variables, tokens, mask: model.apply(rm_variables(variables), tokens, mask).scores)
  return batched_apply(fn, variables, {"tokens": tokens, "mask": mask}, batch_size)


def rm_task(ecfg: Any, mcfg: ModelConfig, spec: dict, objectives: Sequence[str], *,
            inputs: StageInputs | None = None) -> Task:
  """Stage rm's task: K score heads, Bradley-Terry per objective on pair batches (`rm_loss`); the
  score head trains in the "lora" collection under LoRA (`TRAINING_LAYOUT`)."""
  model = Transformer(mcfg)
  B, L = spec["chosen_tokens"].shape
  return make_task("reward_model", rm_loss(model, objectives), _to_training_layout(abstract_variables(model)),
                   _to_training_layout(logical_axes(model)), spec,
                   init=lambda rng: _to_training_layout(init_variables(model, rng)), layout=TRAINING_LAYOUT,
                   model_config=mcfg, tokens_per_step=2 * B * L,
                   flops_per_step=trained_passes(mcfg, ecfg.trainable) * mcfg.flops_per_token(L) * 2 * B * L,
                   inputs=inputs)


# ---------------------------------------------------------------------------------------------
# Data helpers


def fit_responses(examples: Sequence[dict], tokenizer: Any, max_response_len: int, *, template: str = "auto",
                  fields: Sequence[str] = ("chosen", "rejected")) -> tuple[list[dict], int]:
  """Copies of `examples` whose responses are cut (as text, from the right) to fit `max_response_len`
  tokens with their EOS, as the input pipeline tokenizes them. Returns (examples, number cut).

  The pipeline never cuts a response (an over-long row is an error or is dropped); a reward model
  trained on long real responses (HH-RLHF) keeps every pair this way and sees each response's first
  ``max_response_len - 1`` tokens, the same text `RewardModelScorer` scores (it cuts likewise).
  """
  out = [dict(ex) for ex in examples]
  msgs = [normalize_messages(ex["prompt"]) for ex in out]
  n_cut = 0
  for field in fields:
    todo = [i for i, ex in enumerate(out) if ex.get(field)]
    margin = 1
    for _ in range(8):
      if not todo:
        break
      _, r_ids = encode(tokenizer, [msgs[i] for i in todo], [str(out[i][field]) for i in todo], template)
      over = [i for i, r in zip(todo, r_ids) if len(r) > max_response_len]
      for i in over:
        text = str(out[i][field])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        keep = max(max_response_len - 1 - margin, 1)
        offsets = enc["offset_mapping"]
        cut = offsets[keep][0] if keep < len(offsets) else len(text) * keep // max(len(offsets), 1)
        if cut >= len(text):
          cut = max(len(text) - 1, 1)
        out[i][field] = text[:cut].rstrip() or text[:1]
      n_cut += len(over) if margin == 1 else 0
      todo, margin = over, margin * 2
    if todo:
      raise ValueError(f"fit_responses: could not fit {len(todo)} {field} responses into {max_response_len} tokens")
  return out, n_cut


def pair_pipeline(examples: Sequence[dict], tokenizer: Any, *, batch_size: int, max_prompt_len: int,
                  max_response_len: int, template: str = "auto", bucket_multiple: int = 8, train: bool = True,
                  seed: int = 0, strict: bool = True, name: str | None = None) -> Pipeline:
  """The RM's pair pipeline: static shapes; training = shuffled, endless; else one ordered pass."""
  pc = PipelineConfig(kind="pair", batch_size=batch_size, max_prompt_len=max_prompt_len,
                      max_response_len=max_response_len, bucket_multiple=bucket_multiple, template=template,
                      strict=strict, shuffle=train, seed=seed, num_epochs=None if train else 1,
                      drop_remainder=train, static_shapes=True)
  return Pipeline(examples, tokenizer, pc, name=name)


def evaluate_reward_model(model: Transformer, variables: Any, examples: Sequence[dict], tokenizer: Any, *,
                          objectives: Sequence[str], max_prompt_len: int, max_response_len: int,
                          template: str = "auto", batch_size: int = 64, bucket_multiple: int = 8,
                          strict: bool = True, name: str | None = None) -> dict[str, Any]:
  """`pair_accuracy` on held-out pairs (one ordered pass; the last batch padded, never dropped)."""
  pipe = pair_pipeline(examples, tokenizer, batch_size=batch_size, max_prompt_len=max_prompt_len,
                       max_response_len=max_response_len, template=template, bucket_multiple=bucket_multiple,
                       train=False, strict=strict, name=name)
  res = pair_accuracy(model, variables, pipe, objectives)
  res["dropped_over_long"] = pipe.stats["dropped_over_long"]
  return res


# ---------------------------------------------------------------------------------------------
# The stage runner


def _lora_config(engine_cfg: Any):
  lc = engine_cfg.model.lora
  if engine_cfg.trainable != "lora":
    return None
  if int(lc.rank) <= 0:
    raise ValueError("trainable='lora' needs model.lora.rank > 0 in the engine config")
  return LoRAConfig(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout), targets=tuple(lc.targets))


def _save_tokenizer(tokenizer: Any, workdir: str, replace: bool = False) -> str:
  """Save `tokenizer` as WORKDIR/tokenizer (atomically). An existing one must tokenize the same,
  unless `replace` (the run was started with existing="overwrite")."""
  target = files.join(workdir, TOKENIZER_DIR)  # local (absolute) or gs://
  probe = "Hello, world!\n\nHuman: what is 2 + 2? \u00e9\u4e2d"
  if files.as_path(target).exists():
    old = load_tokenizer(target)
    if old(probe)["input_ids"] == tokenizer(probe)["input_ids"] and len(old) == len(tokenizer):
      return str(target)
    if not replace:
      raise ValueError(f"{target} holds another tokenizer than this run's; use another workdir or "
                       "existing='overwrite'")
  if jax.process_index() == 0:
    # saved into a local folder first (save_pretrained writes plain files), checked, then moved (local)
    # or uploaded (gs://) into place
    remote = files.is_remote(target)
    tmp = files.cache_dir(target, "save") if remote else pathlib.Path(target + ".tmp")
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(tmp))
    if load_tokenizer(tmp)(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
      raise ValueError(f"the tokenizer does not round-trip through save_pretrained ({tmp}); pass tokenizer_path")
    if files.as_path(target).exists():
      files.as_path(target).rmtree()
    if remote:
      files.upload(tmp, target)
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      os.replace(tmp, target)
  return target


def reward_model_metadata(*, objectives: Sequence[str], tokenizer_path: str, template: str, max_prompt_len: int,
                          max_response_len: int, backbone_source: str) -> dict:
  """What `load_reward_model` needs, saved as the RM checkpoint's `extra`."""
  return {META_KEY: {"objectives": list(objectives), "tokenizer": str(tokenizer_path), "template": template,
                     "max_prompt_len": int(max_prompt_len), "max_response_len": int(max_response_len),
                     "backbone": str(backbone_source)}}


def train_reward_model(engine_cfg: Any, workdir: str, train_examples: Sequence[dict], tokenizer: Any, *,
                       backbone_source: str, objectives: Sequence[str], model_config: ModelConfig | None = None,
                       max_prompt_len: int, max_response_len: int, template: str = "auto", bucket_multiple: int = 8,
                       existing: str = "auto", name: str = "train", tokenizer_path: str | None = None,
                       strict: bool = True, mesh: Any = None,
                       eval_examples: Sequence[dict] | None = None) -> tuple[Transformer, dict]:
  """Stage 1 end to end: a K-head reward model on the backbone, trained with masked Bradley-Terry.

  engine_cfg: the engine config of the run (batch_size, total_steps, optim, mesh, trainable
    "full" | "lora" with model.lora.*, checkpoint, ...).
  train_examples: schema examples with a pair and ``pair_objectives`` [K].
  backbone_source: `pro_jax.models.sources` source ("scratch" needs `model_config`, whose head /
    num_labels are replaced). The backbone's LM head is dropped; K score heads are initialized fresh.
  tokenizer_path: recorded for `load_reward_model`; None = save `tokenizer` into WORKDIR/tokenizer.
  strict: over-long responses raise (True) or their pairs are dropped (see `fit_responses`).
  eval_examples: held-out pairs: with `log.eval_every_steps > 0` their loss and per-objective pair
    accuracy are logged under eval/ during training.
  Returns (model, variables): the trained plain model (LoRA merged) with head="score", num_labels=K.
  An existing finished run in `workdir` with the same config is loaded, not retrained (`existing`);
  a run stopped by SIGTERM raises `pro_jax.train.trainer.Preempted` (rerun to resume).
  """
  objectives = list(objectives)
  K = len(objectives)
  if K < 1:
    raise ValueError("train_reward_model needs at least one objective")
  bb = load_source(backbone_source)
  if bb.config is None and model_config is None:
    raise ValueError("backbone_source='scratch' needs model_config (the architecture to train)")
  lora = _lora_config(engine_cfg)
  cfg = derive_config(bb, model_config, head="score", num_labels=K, value_head=False, lora=lora)
  if max_prompt_len + max_response_len > cfg.max_seq_len:
    raise ValueError(f"max_prompt_len + max_response_len = {max_prompt_len + max_response_len} exceeds the "
                     f"model's max_seq_len {cfg.max_seq_len}")
  pipe = pair_pipeline(train_examples, tokenizer, batch_size=engine_cfg.batch_size, max_prompt_len=max_prompt_len,
                       max_response_len=max_response_len, template=template, bucket_multiple=bucket_multiple,
                       train=True, seed=int(engine_cfg.seed), strict=strict, name=name)
  held = pair_pipeline(eval_examples, tokenizer, batch_size=engine_cfg.batch_size, max_prompt_len=max_prompt_len,
                       max_response_len=max_response_len, template=template, bucket_multiple=bucket_multiple,
                       train=False, strict=strict, name="eval") if eval_examples else None
  width = pipe.batch_spec()["pair_objectives"].shape[1]
  if width != K:
    raise ValueError(f"{name}: pair_objectives have {width} entries, objectives are {objectives} ({K})")
  if tokenizer_path is None:
    tokenizer_path = _save_tokenizer(tokenizer, workdir, replace=existing == "overwrite")

  extra = reward_model_metadata(objectives=objectives, tokenizer_path=tokenizer_path, template=template,
                                max_prompt_len=max_prompt_len, max_response_len=max_response_len,
                                backbone_source=backbone_source)
  task = rm_task(engine_cfg, cfg, pipe.batch_spec(), objectives,
                 inputs=StageInputs(init=bb.params, data=pipe, extra=extra, eval_data=held))
  result = train(engine_cfg, workdir, task, existing=existing, mesh=mesh)
  raise_if_preempted(result, workdir)
  model, variables, _ = load_reward_model_variables(workdir)
  return model, variables


# ---------------------------------------------------------------------------------------------
# Loading


def load_reward_model_variables(directory: str, step: int | None = None) -> tuple[Transformer, dict, dict]:
  """(plain model, {"params": ...}, metadata) of a reward-model run; LoRA adapters merged in."""
  ck = load_checkpoint(directory, step)
  meta = (ck.extra or {}).get(META_KEY)
  if meta is None or ck.model_config is None:
    raise ValueError(f"{directory}: not a reward-model run (no '{META_KEY}' metadata in its checkpoint)")
  cfg = ck.model_config
  if cfg.head != "score" or cfg.num_labels != len(meta["objectives"]):
    raise ValueError(f"{directory}: model head {cfg.head!r} with {cfg.num_labels} labels does not match the "
                     f"recorded objectives {meta['objectives']}")
  variables = rm_variables(ck.variables)
  params = variables["params"]
  if cfg.lora is not None:
    params = merge_lora(cfg, params, variables["lora"])
    cfg = cfg.replace(lora=None)
  return Transformer(cfg), {"params": params}, meta


def load_reward_model(directory: str, step: int | None = None, *, batch_size: int = 64,
                      name: str | None = None):
  """A trained reward model from its run directory as a `RewardModelScorer` (objectives = its heads).

      rm = load_reward_model("runs/rm")
      rm.objectives                                    # ("helpful", "harmless")
      rm.score(["How do I bake bread?"], ["Mix flour, water, yeast and salt ..."])   # [1, K]

  Prompts are cut from the left to the training max_prompt_len; responses to max_response_len
  tokens (EOS kept), as in training.
  """
  model, variables, meta = load_reward_model_variables(directory, step)
  tok_path = meta["tokenizer"]
  if not files.as_path(tok_path).exists():  # moved workdir: the copy saved next to the checkpoints
    own = files.join(directory, TOKENIZER_DIR)
    if not files.as_path(own).exists():
      raise FileNotFoundError(f"{directory}: the reward model's tokenizer {tok_path} is missing")
    tok_path = own
  tokenizer = load_tokenizer(tok_path)
  return RewardModelScorer(model, variables, tokenizer, meta["objectives"], batch_size=batch_size,
                           max_prompt_len=meta["max_prompt_len"],
                           max_len=meta["max_prompt_len"] + meta["max_response_len"], template=meta["template"],
                           name=name or f"rm:{files.as_path(directory)}")
