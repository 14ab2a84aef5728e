"""A PRO run's shared context: one config and workdir -> the data (train / eval examples), the
tokenizer, the K objectives' scorers (cached in ``W/scores.sqlite``), the normalization statistics
(``W/norm.json``), adapter targets w* and per-example weights. Every stage reads it
(`pro_jax.stages.pipeline`, `pro_jax.stages.evaluate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from typing import Any

import jax
import numpy as np

from pro_jax.data import files, synthetic
from pro_jax.data.tokenize import normalize_messages
from pro_jax.models.encoder_scorer import PRESETS as ENCODER_PRESETS
from pro_jax.models.encoder_scorer import encoder_reward_scorer
from pro_jax.models.encoders import ENCODER_ARCHITECTURES, ENCODER_MODEL_TYPES
from pro_jax.models.hf_io import read_hf_config
from pro_jax.models.tokenizer import load_tokenizer
from pro_jax.pro.normalize import NormStats, fit_norm_stats
from pro_jax.stages.adapter import compute_targets, load_adapter
from pro_jax.stages.policy import resolve_example_weights
from pro_jax.stages.rm import load_reward_model
from pro_jax.stages.scoring import CachedScorer, StackedScorer, hf_reward_scorer, scorer_key
from pro_jax.train.loop import check_workdir


def say(msg: str) -> None:
  print(f"[pro-jax] {msg}", flush=True)



@dataclasses.dataclass
class Context:
  cfg: Any
  workdir: str
  objectives: list[str]
  tokenizer: Any
  tokenizer_path: str
  train: list[dict]
  eval: list[dict]
  task_config: synthetic.SyntheticTaskConfig | None = None
  valid: list[dict] = dataclasses.field(default_factory=list)  # validation prompts (model selection), disjoint from eval
  _scorer: Any = None
  _norm: NormStats | None = None
  unsaved_tokenizer: str | None = None  # local folder of a tokenizer built for W/tokenizer, not saved yet
  _written: bool = False

  def write_workdir(self) -> None:
    """Create the workdir and save a newly built tokenizer to W/tokenizer (whole: a temporary name,
    then a rename; `files.publish_dir`). The first write of a run: stages call it once the config,
    the model sources and the data passed `pro_jax.stages.checks.check_stages`. Idempotent."""
    if self._written:
      return
    if jax.process_index() == 0:
      files.as_path(self.workdir).mkdir(parents=True, exist_ok=True)
      if self.unsaved_tokenizer is not None:
        files.publish_dir(self.unsaved_tokenizer, self.tokenizer_path, last="tokenizer.json")
    self._written = True

  @property
  def K(self) -> int:
    return len(self.objectives)

  def path(self, *parts: str) -> str:
    """`workdir/part/...` (a gs:// workdir gives gs:// paths)."""
    return files.join(self.workdir, *parts)

  def source(self, spec: str) -> str:
    """Resolve "stage:NAME" to this workdir's stage run."""
    if spec.startswith("stage:"):
      name = spec.partition(":")[2]
      if not files.as_path(self.path(name, "checkpoints")).is_dir():
        raise FileNotFoundError(f"{self.path(name)} holds no checkpoint: run `pro-jax {name}` with this "
                                "workdir first")
      return f"checkpoint:{self.path(name)}"
    return spec

  @property
  def scorer(self) -> Any:
    if self._scorer is None:
      self._scorer = build_scorer(self)
    return self._scorer

  @property
  def norm(self) -> NormStats:
    if self._norm is None:
      self._norm = fit_or_load_norm(self)
    return self._norm

  def score(self, prompts, responses) -> np.ndarray:
    return np.asarray(self.scorer.score(list(prompts), list(responses)), np.float32)


def _synthetic_config(cfg: Any) -> synthetic.SyntheticTaskConfig:
  t = cfg.task
  return synthetic.SyntheticTaskConfig(seed=int(cfg.seed), n_train=t.n_train, n_eval=t.n_eval, n_valid=t.n_valid,
                                       eval_fraction=t.eval_fraction, valid_fraction=t.valid_fraction,
                                       n_candidates=t.n_candidates, label_noise=t.label_noise, humor=t.humor)


def remap_objectives(ex: dict, objectives: list[str]) -> dict:
  """The example with its objective-indexed fields in the pipeline's objective order (0 = absent)."""
  own = list(ex["objectives"])
  if own == objectives:
    return ex
  idx = [own.index(o) if o in own else -1 for o in objectives]

  def pick(vec):
    v = np.asarray(vec, np.float32)
    return [float(v[..., i]) if i >= 0 else 0.0 for i in idx] if v.ndim == 1 else \
        [[float(row[i]) if i >= 0 else 0.0 for i in idx] for row in v]

  out = dict(ex, objectives=list(objectives), pair_objectives=pick(ex["pair_objectives"]))
  if len(ex.get("scores", [])):
    out["scores"], out["score_mask"] = pick(ex["scores"]), pick(ex["score_mask"])
  return out


def _sample(rows: list[dict], n: int, seed: int) -> list[dict]:
  """`n` of `rows` drawn with `seed`, in their original order (all of them when n is 0 or >= len)."""
  if not n or len(rows) <= n:
    return list(rows)
  keep = np.random.default_rng(seed).permutation(len(rows))[:n]
  return [rows[i] for i in sorted(keep.tolist())]


def load_context(cfg: Any, workdir: str) -> Context:
  """The run's data, tokenizer and config, read and checked without writing anything: the workdir
  and W/tokenizer are written by `Context.write_workdir` once every check passed."""
  workdir = str(files.as_path(workdir))  # local: absolute; gs://...: as is
  check_workdir(files.as_path(workdir))
  objectives = list(cfg.objectives)
  d = cfg.data
  task_cfg = None
  if tuple(d.sources) == ("synthetic",):
    task_cfg = _synthetic_config(cfg)
    if list(task_cfg.objectives) != objectives:
      raise ValueError(f"objectives {objectives} differ from the synthetic task's {list(task_cfg.objectives)}")
    data = synthetic.generate_task(task_cfg)
    train_ex, eval_ex, valid_ex = data["train"], data["eval"], data.get("validation", [])
  else:
    from pro_jax.data.sources import load_examples  # heavy (tensorflow_datasets): real data sets only
    def read(specs):
      rows = []
      for spec in specs:
        name, _, split = spec.rpartition(":")
        if not name:
          raise ValueError(f"data source {spec!r}: expected BUILDER/CONFIG:SPLIT")
        rows += load_examples(name, split, manual_dir=d.manual_dir or None, data_dir=d.data_dir or None,
                              mode=d.mode)
      return [remap_objectives(ex, objectives) for ex in rows]
    rows = read(d.sources)
    valid_ex = []
    if d.eval_sources:
      train_ex, eval_ex = rows, read(d.eval_sources)
    else:
      order = np.random.default_rng(int(cfg.seed)).permutation(len(rows))
      n_eval = max(1, int(round(d.eval_fraction * len(rows))))
      eval_ex = [rows[i] for i in sorted(order[:n_eval])]
      train_ex = [rows[i] for i in sorted(order[n_eval:])]
    # max_eval / max_train: a seeded sample in the rows' order (not the first rows: with several sources
    # those would all come from the first one)
    eval_ex = _sample(eval_ex, int(d.max_eval or 0), int(cfg.seed) + 2)
    train_ex = _sample(train_ex, int(d.get("max_train", 0) or 0), int(cfg.seed) + 1)
  tokenizer, tok_path, unsaved = _tokenizer(cfg, workdir, task_cfg)
  return Context(cfg, workdir, objectives, tokenizer, tok_path, list(train_ex), list(eval_ex), task_cfg,
                 valid=list(valid_ex), unsaved_tokenizer=unsaved)


def _tokenizer(cfg: Any, workdir: str, task_cfg: synthetic.SyntheticTaskConfig | None
               ) -> tuple[Any, str, str | None]:
  """(tokenizer, the path runs record, a local folder still to be saved as W/tokenizer or None).

  The embedded task's tokenizer is W/tokenizer when that loads; when it is absent it is built (into
  a local temporary folder; deterministic, so every process gets the same) and saved later by
  `Context.write_workdir`; when a saved one fails to load (a half-written tokenizer.json from an
  interrupted write), a warning names it and it is rebuilt the same way (the damaged copy is kept
  as W/tokenizer.damaged)."""
  from transformers import AutoTokenizer  # heavy: imported when a run starts, not with the package
  if not cfg.tokenizer:
    if task_cfg is None:
      raise ValueError("config.tokenizer is empty: only the synthetic task brings its own tokenizer")
    path = files.join(workdir, "tokenizer")
    if files.as_path(path).joinpath("tokenizer.json").exists():
      try:
        return AutoTokenizer.from_pretrained(str(files.local_copy(path))), path, None
      except Exception as e:  # noqa: BLE001 - any failure to load (JSON, tokenizers, missing file) means rebuild
        say(f"warning: the saved tokenizer {path} fails to load ({type(e).__name__}: {str(e)[:200]}); "
            "rebuilding it from the embedded task (the damaged copy is kept as tokenizer.damaged)")
    local = tempfile.mkdtemp(prefix="pro_jax_tokenizer_")
    synthetic.build_tokenizer(task_cfg, local)
    return AutoTokenizer.from_pretrained(local), path, local
  return load_tokenizer(cfg.tokenizer), str(cfg.tokenizer), None


def imported_scorer(directory: str, objective: str) -> Any:
  """An imported HF classifier as the scorer of `objective`: DistilBERT / BART directories through
  `encoder_reward_scorer` (RiC's call for the objective when it has a preset: humor, faithfulness),
  decoder classifiers through `hf_reward_scorer`."""
  hf = read_hf_config(directory)
  archs = set(hf.get("architectures") or [])
  if hf.get("model_type") in ENCODER_MODEL_TYPES or archs & set(ENCODER_ARCHITECTURES):
    return encoder_reward_scorer(directory, objective, preset=objective if objective in ENCODER_PRESETS else None)
  return hf_reward_scorer(directory, objective)


def build_scorer(ctx: Context) -> Any:
  """The K objectives' scorers (stacked, reordered to `objectives`), cached in W/scores.sqlite."""
  parts = []
  for spec in ctx.cfg.scorers:
    if spec == "synthetic":
      parts.append(synthetic.SyntheticRewards(ctx.task_config or _synthetic_config(ctx.cfg)))
    elif spec == "rm":
      parts.append(load_reward_model(ctx.path("rm")))
    elif spec.startswith("hf:"):
      path, _, name = spec[3:].rpartition("=")
      if not path or not name:
        raise ValueError(f"scorer {spec!r}: expected hf:DIR=OBJECTIVE")
      parts.append(imported_scorer(path, name))
    else:
      raise ValueError(f"unknown scorer {spec!r} (synthetic, rm, hf:DIR=OBJECTIVE)")
  stacked = parts[0] if len(parts) == 1 else StackedScorer(parts)
  have = list(stacked.objectives)
  missing = [o for o in ctx.objectives if o not in have]
  if missing:
    raise ValueError(f"no scorer gives objective(s) {missing} (scorers {list(ctx.cfg.scorers)} give {have})")
  if have != ctx.objectives:
    stacked = _Reordered(stacked, [have.index(o) for o in ctx.objectives], ctx.objectives)
  # the cache key identifies what is computed (each scorer's config / weight fingerprint, the order),
  # so a retrained reward model or another task seed never reads stale scores
  ctx.write_workdir()  # the cache is a file in the workdir
  return CachedScorer(stacked, ctx.path("scores.sqlite"))


class _Reordered:
  def __init__(self, scorer, index, objectives):
    self.scorer, self.index, self.objectives = scorer, list(index), tuple(objectives)
    self.key = json.dumps([scorer_key(scorer), self.index])

  def score(self, prompts, responses):
    return np.asarray(self.scorer.score(prompts, responses), np.float32)[:, self.index]


def responses_of(ex: dict) -> list[str]:
  """The scored responses of an example: its `responses`, else its pair."""
  if len(ex.get("responses", [])):
    return list(ex["responses"])
  return [r for r in (ex.get("chosen"), ex.get("rejected")) if r]


def norm_fingerprint(ctx: Context) -> str:
  """What the normalization statistics depend on: the scorers (their cache key: config / weight
  fingerprints and order), the method, the objectives and the training responses they were fit on."""
  h = hashlib.sha256()
  h.update(json.dumps([scorer_key(ctx.scorer), ctx.cfg.norm.method, list(ctx.objectives)]).encode())
  for ex in ctx.train:
    for r in responses_of(ex):
      h.update(json.dumps([normalize_messages(ex["prompt"]), r], sort_keys=True).encode())
  return h.hexdigest()


def fit_or_load_norm(ctx: Context) -> NormStats:
  """W/norm.json, reused only when its fingerprint (`norm_fingerprint`: scorers, method, objectives,
  training responses) matches; otherwise (another scorer, a retrained reward model, other data, or a
  file without a fingerprint) the statistics are fit again and the file replaced."""
  path = ctx.path("norm.json")
  key = norm_fingerprint(ctx)
  if files.as_path(path).exists():
    saved = json.loads(files.as_path(path).read_text())
    if saved.get("fingerprint") == key:
      return NormStats.from_dict(saved, source=path)
    say(f"{path} was fit on other scorers / data / method (fingerprint "
        f"{str(saved.get('fingerprint'))[:12]} != {key[:12]}): fitting it again")
  prompts = [ex["prompt"] for ex in ctx.train for _ in responses_of(ex)]
  responses = [r for ex in ctx.train for r in responses_of(ex)]
  norm = fit_norm_stats(ctx.score(prompts, responses), ctx.objectives, method=ctx.cfg.norm.method)
  ctx.write_workdir()
  if jax.process_index() == 0:
    files.write_text(path, json.dumps(dict(norm.to_dict(), fingerprint=key), indent=2, sort_keys=True) + "\n")
  return norm


def targets_for(ctx: Context, examples: list[dict], tau: float) -> np.ndarray:
  """Adapter targets w*(x) = softmax(r~(x, y_w) / tau) from each prompt's preferred response."""
  raw = ctx.score([ex["prompt"] for ex in examples], [ex["chosen"] for ex in examples])
  return compute_targets(raw, ctx.norm, tau)


def true_weights(examples: list[dict]) -> np.ndarray | None:
  if examples and all("true_weights" in ex for ex in examples):
    return np.asarray([ex["true_weights"] for ex in examples], np.float32)
  return None


def adapter_weights(ctx: Context, examples: list[dict]) -> np.ndarray:
  pref = load_adapter(ctx.path("adapter"))
  if list(pref.objectives) != ctx.objectives:
    raise ValueError(f"the adapter in {ctx.path('adapter')} is for {list(pref.objectives)}, not {ctx.objectives}")
  return pref([ex["prompt"] for ex in examples])


def example_weights(ctx: Context, examples: list[dict], source: str, tau: float) -> np.ndarray:
  return resolve_example_weights(source, len(examples), ctx.K,
                                 targets_NxK=targets_for(ctx, examples, tau) if source == "target" else None,
                                 adapter_fn=lambda: adapter_weights(ctx, examples))


def soft_placeholder(tokenizer: Any) -> tuple[str, int]:
  """(string, id) of the token that carries soft weight embeddings: the tokenizer's unk (else pad)
  token, checked to encode as exactly that one id inside text."""
  for name in ("unk_token", "pad_token"):
    tok = getattr(tokenizer, name, None)
    if tok:
      tid = tokenizer.convert_tokens_to_ids(tok)
      if tokenizer(f"a {tok} {tok}", add_special_tokens=False)["input_ids"][-2:] == [tid, tid]:
        return tok, int(tid)
  raise ValueError("soft weight tokens need a tokenizer whose unk or pad token encodes as one id in text")


def soft_conditioning(ctx: Context) -> tuple[str, int, int]:
  """(placeholder, id, n) for policy.pro.conditioning_mode='soft', else ("", 0, 0)."""
  pro = ctx.cfg.policy.pro
  if pro.conditioning_mode == "text":
    return "", 0, 0
  if pro.conditioning_mode != "soft":
    raise ValueError(f"policy.pro.conditioning_mode must be 'text' or 'soft', got {pro.conditioning_mode!r}")
  placeholder, tid = soft_placeholder(ctx.tokenizer)
  return placeholder, tid, int(pro.soft_tokens)


def write_json(path: str, obj: Any) -> None:
  """`obj` as JSON to `path` (local or gs://), whole; only process 0 writes."""
  if jax.process_index() == 0:
    files.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))
