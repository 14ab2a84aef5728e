"""One object for a trained PRO run: `load_pro(W)`.

    run = pro_jax.load_pro("runs/demo")                 # or gs://bucket/run, or W/policy
    w_BxK = run.weights(["what color is the zorb ?"])   # the preference adapter's weights
    texts = run.generate(["what color is the zorb ?"])  # conditioned on those weights, as in training
    texts = run.generate(prompts, weights=[[0.6, 0.2, 0.2]], temperature=0.7, greedy=False)
    r_NxK = run.score(prompts, texts)                   # the run's reward model (raw; normalized=True)
    run.model, run.variables, run.tokenizer, run.objectives, run.norm, run.adapter

`W` is a PRO workdir (``W/policy``, ``W/adapter``, ``W/rm``, ``W/norm.json``, ``W/tokenizer``) or
one policy run inside it (``W/policy``). A workdir's policy run is ``W/policy``, else its only other
run (a ``policy.pro.name`` such as the experiment configs' ``policy_ric``); with several, name one
(``policy=``). Conditioning follows the checkpoint's own record (its
`extra`: ``conditioning`` text / soft / none, ``decimals``, ``soft_placeholder``, ``objectives``):
a RiC-style policy gets the weights appended to the last user turn (``<w> concise 0.7 ... </w>``) or
as soft weight tokens, exactly as in training; a DPO-type or PPO policy takes no weights (the
weights shaped its training), so `generate` refuses explicit ones for it.

With `mesh` (any axis names: `pro_jax.sharding.rules_for_mesh`) the policy's parameters are placed
on it; generation then runs under `activation_sharding(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from pro_jax.data.pipeline import prompt_arrays
from pro_jax.models import Transformer
from pro_jax.models.generate import generate as generate_tokens
from pro_jax.models.heads import head_to_params
from pro_jax.models.hub import is_hub_id
from pro_jax.models.inference import pad_rows
from pro_jax.models.tokenizer import load_tokenizer
from pro_jax.pro.normalize import NormStats
from pro_jax.sharding import activation_sharding
from pro_jax.stages.adapter import load_adapter
from pro_jax.stages.policy import condition_prompt
from pro_jax.stages.rm import load_reward_model
from pro_jax.train.checkpoint import CHECKPOINTS_DIR, LoadedCheckpoint, load_checkpoint


class RunError(ValueError):
  """A directory that is not a (complete enough) PRO run for what was asked."""


def _is_run(path: epath.Path) -> bool:
  return (path / CHECKPOINTS_DIR).is_dir()


@dataclasses.dataclass
class ProRun:
  """A trained PRO run (see the module docstring). Fields are public for downstream JAX code."""

  workdir: epath.Path  # the PRO workdir
  policy: LoadedCheckpoint  # the policy run as loaded (config, extra, step, directory)
  model: Transformer  # the policy transformer (no value head; LoRA applied unmerged when trained with it)
  variables: Any  # {"params": ..., ["lora": ...]}
  tokenizer: Any
  objectives: tuple[str, ...]
  conditioning: str  # "text" | "soft" | "none"
  decimals: int
  soft_placeholder: str
  max_prompt_len: int
  template: str
  adapter: Any = None  # PreferenceAdapter or None
  reward_model: Any = None  # RewardModelScorer or None
  norm: NormStats | None = None
  mesh: Any = None
  rules: Any = None

  @property
  def params(self) -> Any:
    return self.variables["params"]

  @property
  def model_config(self) -> Any:
    return self.model.config

  # -- weights -----------------------------------------------------------------------------------

  def weights(self, prompts: Sequence[Any]) -> np.ndarray:
    """The preference adapter's weights [B, K] (rows on the simplex) for prompts (text or messages)."""
    if self.adapter is None:
      raise RunError(f"{self.workdir}: the run has no preference adapter ({self.workdir / 'adapter'})")
    return np.asarray(self.adapter(list(prompts)), np.float32)

  def _weights_for(self, prompts: Sequence[Any], weights: Any) -> np.ndarray | None:
    n, k = len(prompts), len(self.objectives)
    if weights is None:
      return self.weights(prompts) if self.conditioning != "none" else None
    if self.conditioning == "none":
      raise RunError(f"{self.policy.directory}: this policy ({self.policy.extra.get('loss')}) takes no weights at "
                     "inference; its training used them. Generate without weights.")
    w = np.asarray(weights, np.float64)
    if w.ndim == 1:
      w = np.broadcast_to(w, (n, w.shape[0]))
    if w.shape != (n, k):
      raise RunError(f"weights: expected [{n}, {k}] (objectives {list(self.objectives)}), got {list(w.shape)}")
    if not np.isfinite(w).all() or (w < 0).any() or not np.allclose(w.sum(1), 1.0, atol=1e-3):
      raise RunError(f"weights: each row must be non-negative and sum to 1 (objectives {list(self.objectives)}); "
                     f"got {w.tolist()}")
    return w.astype(np.float32)

  def condition(self, prompt: Any, weights: Sequence[float]) -> Any:
    """The prompt as the policy saw it in training for these weights (unchanged for 'none')."""
    if self.conditioning == "none":
      return prompt
    return condition_prompt(prompt, weights, self.objectives, self.decimals, soft_placeholder=self.soft_placeholder,
                            soft_tokens=self.model.config.weight_tokens if self.conditioning == "soft" else 0)

  # -- generation ----------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Any], weights: Any = None, *, max_new_tokens: int = 64, greedy: bool = True,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
               return_weights: bool = False) -> list[str] | tuple[list[str], np.ndarray | None]:
    """Responses (text, EOS and special tokens removed) to `prompts`.

    weights: None = the adapter's weights for each prompt (conditioned policies); else [K] or [B, K]
      explicit weights. Sampling: greedy, or temperature / top_k / top_p with `seed`.
    return_weights: also return the weights used ([B, K], None for an unconditioned policy).
    """
    prompts = list(prompts)
    if not prompts:
      return ([], None) if return_weights else []
    w = self._weights_for(prompts, weights)
    conditioned = [self.condition(p, w[i]) if w is not None else p for i, p in enumerate(prompts)]
    tokens, mask = prompt_arrays(self.tokenizer, conditioned, self.max_prompt_len, self.template)
    eos = self.tokenizer.eos_token_id
    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
    soft = self.conditioning == "soft"
    texts: list[str] = []
    rng = jax.random.PRNGKey(seed)
    ctx = activation_sharding(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()
    with ctx:
      for s in range(0, len(prompts), batch_size):
        k = len(tokens[s:s + batch_size])
        chunk = pad_rows({"t": tokens[s:s + batch_size], "m": mask[s:s + batch_size],
                          "w": w[s:s + batch_size] if soft else None}, batch_size)
        res = generate_tokens(self.model, self.variables, chunk["t"], chunk["m"], max_new_tokens=max_new_tokens,
                              rng=jax.random.fold_in(rng, s), temperature=temperature, top_k=top_k, top_p=top_p,
                              greedy=greedy, eos_token_id=eos, pad_token_id=pad, return_logprobs=False,
                              weights_BxK=chunk["w"])
        out, omask = np.asarray(res.tokens_BxN)[:k], np.asarray(res.response_mask_BxN)[:k]
        for row, mrow in zip(out, omask):
          ids = [int(x) for x, m in zip(row, mrow) if m and x != eos]
          texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return (texts, w) if return_weights else texts

  # -- scoring -------------------------------------------------------------------------------------

  def score(self, prompts: Sequence[Any], responses: Sequence[str], *, normalized: bool = False) -> np.ndarray:
    """The run's reward model on (prompt, response) pairs: [N, K] raw rewards in `objectives` order
    (normalized with the run's statistics when `normalized`)."""
    if self.reward_model is None:
      raise RunError(f"{self.workdir}: the run has no trained reward model ({self.workdir / 'rm'}); its scorers "
                     "were programmatic or external")
    order = [list(self.reward_model.objectives).index(o) for o in self.objectives
             if o in self.reward_model.objectives]
    r = np.asarray(self.reward_model.score(list(prompts), list(responses)), np.float32)
    if len(order) == len(self.objectives):
      r = r[:, order]
    if normalized:
      if self.norm is None:
        raise RunError(f"{self.workdir}: no normalization statistics (norm.json)")
      r = self.norm.apply(r)
    return r


_NOT_POLICIES = ("sft", "rm", "adapter")  # the other stages' runs in a workdir


def _find(path: epath.Path) -> tuple[epath.Path, epath.Path]:
  """(PRO workdir, policy run) from a workdir or a policy run directory. A workdir's policy run is
  ``policy/``, else its only other run (``policy.pro.name``, e.g. ``policy_ric`` of the experiment
  configs); several are ambiguous."""
  if _is_run(path) and not (path / "policy").exists():
    return path.parent, path
  if (path / "policy").exists() and _is_run(path / "policy"):
    return path, path / "policy"
  runs = sorted(p.name for p in path.iterdir() if p.name not in _NOT_POLICIES and _is_run(p)) if path.is_dir() else []
  if len(runs) == 1:
    return path, path / runs[0]
  if runs:
    raise RunError(f"{path}: several policy runs {runs}; pick one with policy=NAME (pro-jax generate --policy NAME)")
  raise RunError(f"{path}: neither a PRO workdir (with a policy run such as policy/) nor a policy run (with "
                 f"{CHECKPOINTS_DIR}/)")


def _tokenizer(tok: str, workdir: epath.Path, where: Any) -> Any:
  """The run's tokenizer: the recorded path (a relative one also under the workdir), a Hub id, or
  W/tokenizer (the embedded task's)."""
  candidates = []
  if tok:
    candidates.append(tok)
    if not os.path.isabs(tok) and "://" not in tok:
      candidates.append(str(workdir / tok))
  candidates.append(str(workdir / "tokenizer"))
  for c in candidates:
    if epath.Path(c).exists() or (c == tok and is_hub_id(c)):
      return load_tokenizer(c)
  raise RunError(f"{where}: the run's tokenizer {tok!r} is not found (looked at {candidates})")


def load_pro(workdir: str | os.PathLike, *, policy: str | None = None, mesh: Any = None, rules: Any = None,
             with_reward_model: bool = True) -> ProRun:
  """Load a trained PRO run for use (see the module docstring).

  Args:
    workdir: the PRO workdir (local or gs://), or a policy run inside it.
    policy: the policy run's name inside the workdir (default "policy", else the workdir's only policy run,
      or the run `workdir` names).
    mesh / rules: place the policy on a mesh of your own (any axis names).
    with_reward_model: load W/rm when present (for `score`).
  """
  path = epath.Path(workdir)
  root, run = _find(path) if policy is None else (path, path / policy)
  if not _is_run(run):
    raise RunError(f"{run}: no policy run ({CHECKPOINTS_DIR}/ missing)")
  ck = load_checkpoint(run, mesh=mesh, rules=rules)
  if ck.model_config is None or ck.model_config.head != "lm":
    raise RunError(f"{run}: not a policy run (its model has no LM head)")
  extra = ck.extra or {}
  variables = head_to_params(ck.variables, "value_head")
  params = {k: v for k, v in variables["params"].items() if k != "value_head"}
  variables = {**variables, "params": params}
  if not variables.get("lora"):
    variables.pop("lora", None)
  cfg = ck.model_config.replace(value_head=False)
  if "lora" not in variables:
    cfg = cfg.replace(lora=None)
  objectives = tuple(extra.get("objectives") or ())
  conditioning = extra.get("conditioning", "none")
  tokenizer = _tokenizer(str(extra.get("tokenizer", "")), root, run)
  adapter = load_adapter(str(root / "adapter")) if _is_run(root / "adapter") else None
  if adapter is not None and objectives and tuple(adapter.objectives) != objectives:
    raise RunError(f"{root}: the adapter's objectives {adapter.objectives} differ from the policy's {objectives}")
  objectives = objectives or (tuple(adapter.objectives) if adapter is not None else ())
  rm = load_reward_model(str(root / "rm")) if with_reward_model and _is_run(root / "rm") else None
  norm = None
  if extra.get("norm"):
    norm = NormStats.from_dict(extra["norm"], source=f"{run} (checkpoint extra)")
  elif (root / "norm.json").exists():
    norm = NormStats.from_dict(json.loads((root / "norm.json").read_text()), source=str(root / "norm.json"))
  pro = ck.config.get("pro") if hasattr(ck.config, "get") else None
  max_prompt_len = int((pro.get("max_prompt_len") if pro is not None else None) or 256)
  template = adapter.template if adapter is not None and getattr(adapter, "template", None) else "auto"
  return ProRun(workdir=root, policy=ck, model=Transformer(cfg), variables=variables, tokenizer=tokenizer,
                objectives=objectives, conditioning=conditioning, decimals=int(extra.get("decimals", 1)),
                soft_placeholder=str(extra.get("soft_placeholder", "")), max_prompt_len=max_prompt_len,
                template=template, adapter=adapter, reward_model=rm, norm=norm, mesh=mesh, rules=rules)
