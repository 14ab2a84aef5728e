"""Tasks for the generic `pro-jax train` command: language modelling and the engine's toy DPO.

`build_task(cfg)` picks by `cfg.loss.name`:
* "lm": next-token loss on `cfg.data` (kind "synthetic", or "tokens" with `data.path` a token file);
* "dpo": the TOY sigmoid DPO (`losses.toy_dpo_loss`) of the policy against a frozen reference
  (`reference.source = "policy"`: a copy of the initial policy in `reference.param_dtype`) on
  synthetic pairs. Used by the engine's tests and by `pro-jax aot` to size the 7B step.
Stages with their own losses build their own `Task` the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pro_jax.configs import ConfigError
from pro_jax.models import Transformer, abstract_variables, init_variables, logical_axes
from pro_jax.train import data as tdata
from pro_jax.train import flops as train_flops
from pro_jax.train.config import model_config_from
from pro_jax.train.losses import lm_loss, toy_dpo_loss
from pro_jax.train.trainer import Task, jit_init

LOSSES = ("lm", "dpo")


def _lm_data(cfg, vocab: int):
  kind = cfg.data.kind
  if kind == "synthetic":
    return lambda rows: tdata.SyntheticLM(cfg.seed, cfg.batch_size, cfg.data.seq_len, vocab, rows)
  if kind == "tokens":
    if not cfg.data.path:
      raise ConfigError("data.kind='tokens' needs data.path (a .npy of token ids or a .bin of uint16)")
    tdata.TokenFileLM(cfg.data.path, cfg.seed, cfg.batch_size, cfg.data.seq_len, vocab)  # check it now
    return lambda rows: tdata.TokenFileLM(cfg.data.path, cfg.seed, cfg.batch_size, cfg.data.seq_len, vocab, rows)
  raise ConfigError(f"data.kind={kind!r} is not usable with loss.name='lm' (use 'synthetic' or 'tokens')")


def build_task(cfg) -> Task:
  name = cfg.loss.name
  if name not in LOSSES:
    raise ConfigError(f"loss.name must be one of {LOSSES} for the generic train command, got {name!r}")
  mcfg = model_config_from(cfg.model)
  model = Transformer(mcfg)
  B, L = cfg.batch_size, cfg.data.seq_len
  abstract = abstract_variables(model)
  init = jit_init(lambda rng: init_variables(model, rng))
  common = dict(abstract_variables=abstract, logical_axes=logical_axes(model), init_variables=init,
                model_config=mcfg)
  if name == "lm":
    spec = {k: jax.ShapeDtypeStruct((B, L), jnp.int32) for k in ("tokens", "mask", "loss_mask")}
    return Task(loss_fn=lm_loss(model), batch_spec=spec, make_data=_lm_data(cfg, mcfg.vocab_size),
                tokens_per_step=B * L, flops_per_step=train_flops.model_flops_per_step(mcfg, B * L, L), name="lm",
                **common)
  # toy DPO: policy + frozen reference
  if cfg.reference.source != "policy":
    raise ConfigError("loss.name='dpo' (the engine's toy DPO) needs reference.source='policy'")
  if cfg.data.kind != "synthetic_pairs":
    raise ConfigError(f"loss.name='dpo' uses data.kind='synthetic_pairs', got {cfg.data.kind!r}")
  ref_cfg = mcfg.replace(param_dtype=cfg.reference.param_dtype, lora=None)
  ref_model = Transformer(ref_cfg)
  seed = cfg.seed

  def init_ref():  # the initial policy's base weights, cast to the reference dtype
    v = init_variables(model, jax.random.PRNGKey(seed))
    return {"ref": {"params": jax.tree.map(lambda x: x.astype(ref_cfg.jnp_param_dtype), v["params"])}}

  ref_abstract = {"ref": abstract_variables(ref_model)}
  ref_axes = {"ref": logical_axes(ref_model)}
  Lp = cfg.data.prompt_len
  spec = {}
  for side in ("chosen", "rejected"):
    for f in ("tokens", "mask", "loss_mask"):
      spec[f"{side}_{f}"] = jax.ShapeDtypeStruct((B, L), jnp.int32)
  spec["prompt_tokens"] = jax.ShapeDtypeStruct((B, Lp), jnp.int32)
  spec["prompt_mask"] = jax.ShapeDtypeStruct((B, Lp), jnp.int32)
  tokens = 2 * B * L  # chosen + rejected through the policy (and again through the reference)
  return Task(
      loss_fn=toy_dpo_loss(model, ref_model, beta=cfg.loss.beta, concat_pairs=cfg.loss.concat_pairs),
      batch_spec=spec,
      make_data=lambda rows: tdata.SyntheticPairs(cfg.seed, B, L, mcfg.vocab_size, Lp, rows),
      frozen_abstract=ref_abstract, frozen_logical_axes=ref_axes,
      init_frozen=lambda shardings: jax.jit(init_ref, out_shardings=shardings)(),
      tokens_per_step=tokens, name="dpo",
      flops_per_step=train_flops.model_flops_per_step(mcfg, tokens, L, extra_forward_tokens=tokens), **common)
