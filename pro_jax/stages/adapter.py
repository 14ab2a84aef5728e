"""Stages 3-4: adapter targets and the preference adapter f_psi(x) -> weights on the simplex.

* Targets: ``w*(x) = softmax(r~(x, y_w) / tau)``: the preferred response's normalized rewards say
  which objectives mattered for this prompt (`compute_targets`).
* Features: ``h(x)`` = mean-pooled final hidden states over the prompt tokens of a FROZEN backbone
  (default: the reference policy), computed inside the train step (`prompt_features`).
* Adapter: ``f(x) = softmax(g(h(x)))``, g a small MLP (`AdapterMLP`: LayerNorm -> `layers` dense
  layers of width `hidden` with GELU -> K logits). Loss: KL(w* || f) (`pro_jax.pro.losses.adapter_kl`).
* Deployment: `PreferenceAdapter` (and `load_adapter(dir)`) maps prompts (text or tokens) to
  weights [B, K] with the backbone and tokenizer recorded in the adapter's checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pro_jax.data.pipeline import Pipeline, PipelineConfig, prompt_arrays
from pro_jax.models import ModelConfig, Transformer
from pro_jax.models.inference import batched_apply
from pro_jax.models.sources import load_source
from pro_jax.models.tokenizer import load_tokenizer
from pro_jax.pro import metrics
from pro_jax.pro.losses import adapter_kl
from pro_jax.pro.normalize import NormStats
from pro_jax.pro.ops import mean_pool
from pro_jax.pro.weights import target_weights
from pro_jax.stages.stage import StageInputs, make_task
from pro_jax.train.checkpoint import load_checkpoint
from pro_jax.train.trainer import Task, raise_if_preempted, train


class AdapterMLP(nn.Module):
  """g_psi: features [B, D] -> logits [B, K]. Parameters are tiny next to the backbone."""

  num_objectives: int
  hidden: int = 256
  layers: int = 2

  @nn.compact
  def __call__(self, features_BxD: jax.Array) -> jax.Array:
    x = nn.LayerNorm(name="in_norm")(features_BxD.astype(jnp.float32))
    for i in range(self.layers - 1):
      x = nn.gelu(nn.Dense(self.hidden, name=f"dense_{i}")(x))
    return nn.Dense(self.num_objectives, name="out", kernel_init=nn.initializers.zeros)(x)


def adapter_variables(adapter: AdapterMLP, d_model: int, rng: jax.Array) -> dict:
  return adapter.init(rng, jnp.zeros((1, d_model), jnp.float32))


def adapter_axes(variables: Any) -> Any:
  """Logical axes of the adapter's variables: all replicated (it is a few hundred KB)."""
  return jax.tree.map(lambda x: jax.sharding.PartitionSpec(*([None] * len(np.shape(x)))), variables)


def prompt_features(backbone: Transformer, backbone_variables: Any, prompt_tokens_BxL: jax.Array,
                    prompt_mask_BxL: jax.Array) -> jax.Array:
  """h(x): mean over real prompt tokens of the frozen backbone's final hidden states, [B, D] f32."""
  hidden = backbone.apply(backbone_variables, prompt_tokens_BxL, prompt_mask_BxL).hidden
  return jax.lax.stop_gradient(mean_pool(hidden, prompt_mask_BxL))


def compute_targets(scores_NxK: np.ndarray, norm: NormStats, tau: float = 1.0) -> np.ndarray:
  """w* [N, K] from the raw scores of each prompt's preferred response."""
  return np.asarray(target_weights(norm.apply(np.asarray(scores_NxK, np.float32)), tau), np.float32)


def adapter_loss(adapter: AdapterMLP, backbone: Transformer):
  """Plug-in loss on a prompt batch with a `target_weights` [B, K] field; frozen["backbone"]."""

  def loss_fn(params: Any, frozen: Any, batch: dict, rng: jax.Array):
    del rng
    features_BxD = prompt_features(backbone, frozen["backbone"], batch["prompt_tokens"], batch["prompt_mask"])
    logits_BxK = adapter.apply(params, features_BxD)
    real_B = (batch["example_id"] >= 0).astype(jnp.float32)
    loss, loss_metrics = adapter_kl(batch["target_weights"], logits_BxK, real_B)
    loss_metrics = dict(loss_metrics)
    loss_metrics["loss_weight"] = real_B.sum()
    return loss, loss_metrics

  return loss_fn


def adapter_task(ecfg: Any, backbone_config: ModelConfig, spec: dict, num_objectives: int, *, hidden: int,
                 layers: int, inputs: StageInputs | None = None) -> Task:
  """Stage adapter's task: the MLP over mean-pooled prompt features of the frozen backbone
  (`frozen["backbone"]`, `backbone_config` with head="none"); its variables are all replicated."""
  del ecfg  # the adapter MLP trains fully whatever the stage's `trainable`
  backbone = Transformer(backbone_config)
  adapter = AdapterMLP(num_objectives, hidden=hidden, layers=layers)
  d_model = backbone_config.d_model
  abstract = jax.eval_shape(lambda: adapter_variables(adapter, d_model, jax.random.PRNGKey(0)))
  B, Lp = spec["prompt_tokens"].shape
  return make_task("adapter", adapter_loss(adapter, backbone), abstract, adapter_axes(abstract), spec,
                   init=lambda rng: adapter_variables(adapter, d_model, rng),
                   frozen={"backbone": (backbone, backbone_config.param_dtype)}, model_config=None,
                   tokens_per_step=B * Lp, flops_per_step=backbone_config.flops_per_token(Lp) * B * Lp, inputs=inputs)


@dataclasses.dataclass
class PreferenceAdapter:
  """Deployment: prompts -> per-prompt objective weights [B, K] (numpy float32)."""

  adapter: AdapterMLP
  params: Any
  backbone: Transformer
  backbone_variables: Any
  tokenizer: Any
  objectives: tuple[str, ...]
  max_prompt_len: int = 256
  template: str = "auto"
  batch_size: int = 64

  def __post_init__(self):
    self.objectives = tuple(self.objectives)
    adapter, backbone = self.adapter, self.backbone

    def fn(params, bvars, tokens, mask):
      return jax.nn.softmax(adapter.apply(params, prompt_features(backbone, bvars, tokens, mask)), axis=-1)

    self._fn = jax.jit(fn)

  def from_tokens(self, prompt_tokens_BxL: Any, prompt_mask_BxL: Any) -> np.ndarray:
    """Weights for left-padded prompt tokens (any batch size; one compile per shape)."""
    return np.asarray(self._fn(self.params, self.backbone_variables, prompt_tokens_BxL, prompt_mask_BxL))

  def tokenize(self, prompts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    return prompt_arrays(self.tokenizer, prompts, self.max_prompt_len, self.template)

  def __call__(self, prompts: Sequence[Any]) -> np.ndarray:
    """Weights [N, K] for prompts given as text or schema messages."""
    tokens, mask = self.tokenize(prompts)
    fn = lambda weights, tokens, mask: self._fn(weights[0], weights[1], tokens, mask)
    out = batched_apply(fn, (self.params, self.backbone_variables), {"tokens": tokens, "mask": mask}, self.batch_size)
    return np.asarray(out, np.float32)


def evaluate_adapter(weights_NxK: np.ndarray, targets_NxK: np.ndarray) -> dict[str, float]:
  """Held-out KL(w* || f), top-1 objective agreement and mean per-prompt Spearman correlation."""
  w = np.clip(np.asarray(targets_NxK, np.float64), 0, None)
  f = np.clip(np.asarray(weights_NxK, np.float64), 1e-12, None)
  kl = np.sum(np.where(w > 0, w * (np.log(np.where(w > 0, w, 1.0)) - np.log(f)), 0.0), axis=1)
  rho, defined = metrics.mean_row_spearman(f, w)
  return {"kl": float(kl.mean()), "top1_agreement": float(metrics.top1_agreement(f, w)),
          "spearman": float(rho), "spearman_defined": int(defined)}


def adapter_metadata(*, backbone_source: str, tokenizer_path: str, objectives: Sequence[str], hidden: int,
                     layers: int, max_prompt_len: int, template: str, d_model: int) -> dict:
  """What `load_adapter` needs, saved as the adapter checkpoint's `extra`."""
  return {"adapter": {"backbone": backbone_source, "tokenizer": str(tokenizer_path),
                      "objectives": list(objectives), "hidden": hidden, "layers": layers,
                      "max_prompt_len": max_prompt_len, "template": template, "d_model": d_model}}


def load_adapter(directory: str, step: int | None = None, *, batch_size: int = 64) -> PreferenceAdapter:
  """A trained preference adapter from its run directory: a callable prompts -> weights [B, K].

      adapter = pro_jax.load_adapter("runs/demo/adapter")
      w = adapter(["what color is the zorb ?"])      # [1, K], rows on the simplex
      adapter.objectives                              # the K names
  """
  ck = load_checkpoint(directory, step)
  meta = (ck.extra or {}).get("adapter")
  if meta is None:
    raise ValueError(f"{directory}: not a preference-adapter run (no 'adapter' metadata in its checkpoint)")
  bb = load_source(meta["backbone"])
  if bb.config is None:
    raise ValueError(f"{directory}: the adapter's backbone source {meta['backbone']!r} holds no weights")
  backbone = Transformer(bb.config.replace(head="none", value_head=False, lora=None))
  tokenizer = bb.tokenizer if meta["tokenizer"] in ("", "builtin") else load_tokenizer(meta["tokenizer"])
  adapter = AdapterMLP(len(meta["objectives"]), hidden=meta["hidden"], layers=meta["layers"])
  return PreferenceAdapter(adapter, ck.variables, backbone, {"params": bb.params}, tokenizer,
                           tuple(meta["objectives"]), max_prompt_len=meta["max_prompt_len"],
                           template=meta["template"], batch_size=batch_size)


def encoder_tokenizer(backbone_source: str, backbone: Any, tokenizer: Any, tokenizer_path: str) -> tuple[Any, str]:
  """The tokenizer of the adapter's feature encoder, and its path for the checkpoint: the encoder's
  own where the source brings one (a llama2.c source: "builtin"; an "hf:DIR" source whose DIR holds
  tokenizer files), else `tokenizer` (the policy's: right for the default encoder, the reference
  policy). A ValueError when that tokenizer's ids do not fit the encoder's vocabulary (another
  encoder would silently read the policy's token ids as its own)."""
  if backbone.tokenizer is not None:
    tokenizer, tokenizer_path = backbone.tokenizer, "builtin"
  elif backbone_source.startswith("hf:"):
    directory = backbone_source[3:]
    try:
      own = load_tokenizer(directory)
    except Exception:  # noqa: BLE001 - no tokenizer files in DIR: fall back to the given tokenizer
      own = None
    if own is not None:
      tokenizer, tokenizer_path = own, directory
  vocab = backbone.config.vocab_size
  if len(tokenizer) > vocab:
    raise ValueError(f"the adapter's feature encoder {backbone_source!r} has a vocabulary of {vocab} tokens, but the "
                     f"tokenizer {tokenizer_path!r} has {len(tokenizer)}: its token ids are not the encoder's. Give "
                     "the encoder its own tokenizer (an hf:DIR with tokenizer files, or a llama2.c source) or use "
                     "the policy's backbone")
  return tokenizer, tokenizer_path


def train_adapter(engine_cfg: Any, workdir: str, examples: Sequence[dict], targets_NxK: np.ndarray,
                  tokenizer: Any, *, backbone_source: str, tokenizer_path: str, objectives: Sequence[str],
                  hidden: int = 256, layers: int = 2, max_prompt_len: int = 256, template: str = "auto",
                  bucket_multiple: int = 8, existing: str = "auto", name: str = "train",
                  norm: NormStats | None = None, eval_examples: Sequence[dict] | None = None,
                  eval_targets: np.ndarray | None = None) -> PreferenceAdapter:
  """Stage 4 end to end: train f_psi on (prompt, w*) with the engine, return the deployable adapter.

  engine_cfg: the engine config of the run (batch_size, total_steps, optim, mesh, checkpoint, ...).
  backbone_source: the frozen feature backbone (`pro_jax.models.sources` source string; default use:
    the reference policy's checkpoint). tokenizer_path: saved in the checkpoint for `load_adapter`
    ("builtin" = the tokenizer that comes with a llama2.c source). norm: the normalization
    statistics the targets were computed with, saved with the checkpoint (`extra["norm"]`).
    eval_examples / eval_targets: held-out prompts and their w*: with `log.eval_every_steps > 0` the
    held-out KL(w* || f(x)) and its metrics are logged under eval/ during training.
  """
  targets_NxK = np.asarray(targets_NxK, np.float32)
  K = len(objectives)
  if targets_NxK.shape != (len(examples), K):
    raise ValueError(f"targets of shape {targets_NxK.shape} for {len(examples)} examples and {K} objectives")
  bb = load_source(backbone_source)
  if bb.config is None:
    raise ValueError(f"the adapter's backbone {backbone_source!r} must hold weights (not 'scratch')")
  tokenizer, tokenizer_path = encoder_tokenizer(backbone_source, bb, tokenizer, tokenizer_path)
  backbone_config = bb.config.replace(head="none", value_head=False, lora=None)
  rows = [dict(ex, target_weights=targets_NxK[i].tolist()) for i, ex in enumerate(examples)]
  pc = PipelineConfig(kind="prompt", batch_size=engine_cfg.batch_size, max_prompt_len=max_prompt_len,
                      max_response_len=1, bucket_multiple=bucket_multiple, template=template,
                      extra_fields=("target_weights",), shuffle=True, seed=int(engine_cfg.seed),
                      num_epochs=None, static_shapes=True)
  pipe = Pipeline(rows, tokenizer, pc, name=name)
  held = None
  if eval_examples:
    eval_targets = np.asarray(eval_targets, np.float32)
    eval_rows = [dict(ex, target_weights=eval_targets[i].tolist()) for i, ex in enumerate(eval_examples)]
    held = Pipeline(eval_rows, tokenizer, dataclasses.replace(pc, shuffle=False, num_epochs=1, drop_remainder=False),
                    name="eval")
  extra = dict(adapter_metadata(backbone_source=backbone_source, tokenizer_path=tokenizer_path, objectives=objectives,
                                hidden=hidden, layers=layers, max_prompt_len=max_prompt_len, template=template,
                                d_model=backbone_config.d_model),
               **({"norm": norm.to_dict()} if norm is not None else {}))
  task = adapter_task(engine_cfg, backbone_config, pipe.batch_spec(), K, hidden=hidden, layers=layers,
                      inputs=StageInputs(frozen={"backbone": {"params": bb.params}}, data=pipe, extra=extra,
                                         eval_data=held))
  result = train(engine_cfg, workdir, task, existing=existing)
  raise_if_preempted(result, workdir)
  return load_adapter(workdir)
