"""Evaluation: generate on held-out prompts with PRO's weights and with a grid of fixed weights,
score with the K objectives, and compare.

For each *setting* (a name and per-prompt weights [N, K]: PRO = the adapter's f(x); a fixed vector
repeated; optionally the oracle) the policy generates one response per prompt (conditioned on the
weights when it is a weight-conditioned policy), the scorer gives raw rewards [N, K], the saved
normalization turns them into r~, and

* per-objective means (raw and normalized),
* the per-prompt utility U(x, y) = sum_k w*_k(x) r~_k(x, y) (w* = the prompt's true / target
  weights, `utility_weights`), averaged,
* KL(pi || pi_ref) on the generated responses (when a reference is given),
* win rate of PRO against each setting (per prompt, on U; ties count half),
* the Pareto front of the fixed-weight settings (mean r~ per objective), its hypervolume, and
  whether PRO's point is dominated,

go into a JSON and a markdown report and a PNG plot of the fixed-weight front with PRO's point.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from pro_jax.data import files, synthetic
from pro_jax.data.pipeline import pad_right, prompt_arrays, round_up
from pro_jax.data.tokenize import decode_responses, eos_id, normalize_messages, pad_id
from pro_jax.models import Transformer
from pro_jax.models.generate import generate
from pro_jax.models.inference import batched_apply, pad_rows
from pro_jax.models.sources import load_source
from pro_jax.pro import metrics as pm
from pro_jax.pro import ops
from pro_jax.pro.normalize import NormStats
from pro_jax.pro.weights import format_rewards_text, rewards_from_preference, simplex_grid
from pro_jax.stages.adapter import evaluate_adapter
from pro_jax.stages.context import Context, adapter_weights, say, targets_for, true_weights
from pro_jax.stages.policy import condition_prompt, resolve_example_weights
from pro_jax.train.checkpoint import load_checkpoint


@dataclasses.dataclass
class Policy:
  """A policy to evaluate. `conditioned`: a weight-conditioned policy (RiC-style): its prompt carries
  the weights as text, or, with `soft_tokens` > 0, as `soft_tokens` placeholders whose embeddings the
  model shifts by the weights (`weights_BxK`)."""

  name: str
  model: Transformer
  variables: Any
  conditioned: bool = False
  soft_placeholder: str = ""
  soft_tokens: int = 0
  # RiC proper (`conditioning="rewards"`): {"low": [K], "high": [K], "method": "l2", "decimals": 1}; the
  # weights are mapped to target rewards (`weights.rewards_from_preference`) and the prompt carries those
  reward_map: dict | None = None

  def condition(self, prompt: Any, weights: Any, objectives: Sequence[str]) -> Any:
    if not self.conditioned:
      return prompt
    if self.reward_map is not None:
      m = self.reward_map
      target = rewards_from_preference(weights, m["low"], m["high"], m.get("method", "l2"), m.get("decimals", 1))
      return condition_prompt(prompt, weights, objectives, text=format_rewards_text(target, objectives,
                                                                                    m.get("decimals", 1)))
    return condition_prompt(prompt, weights, objectives, soft_placeholder=self.soft_placeholder,
                            soft_tokens=self.soft_tokens)


@dataclasses.dataclass
class GenerationConfig:
  max_prompt_len: int = 64
  max_new_tokens: int = 48
  batch_size: int = 128
  greedy: bool = True
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  template: str = "auto"


def generate_texts(model: Transformer, variables: Any, tokenizer: Any, prompts: Sequence[Any],
                   gen: GenerationConfig, weights_NxK: np.ndarray | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Responses (decoded text without EOS), their token ids [N, T] and masks [N, T].
  `weights_NxK`: per-prompt weights for a model with soft weight tokens."""
  tokens, mask = prompt_arrays(tokenizer, prompts, gen.max_prompt_len, gen.template)
  n, B = len(tokens), gen.batch_size
  eos, pad = eos_id(tokenizer), pad_id(tokenizer)
  out_tok = np.zeros((n, gen.max_new_tokens), np.int32)
  out_mask = np.zeros((n, gen.max_new_tokens), np.int32)
  rng = jax.random.PRNGKey(gen.seed)
  for s in range(0, n, B):
    k = len(tokens[s:s + B])
    chunk = pad_rows({"t": tokens[s:s + B], "m": mask[s:s + B],
                      "w": None if weights_NxK is None else np.asarray(weights_NxK[s:s + B], np.float32)}, B)
    t, m, w = chunk["t"], chunk["m"], chunk["w"]
    res = generate(model, variables, t, m, max_new_tokens=gen.max_new_tokens, rng=jax.random.fold_in(rng, s),
                   temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, greedy=gen.greedy,
                   eos_token_id=eos, pad_token_id=pad, return_logprobs=False, weights_BxK=w)
    out_tok[s:s + k] = np.asarray(res.tokens_BxN)[:k]
    out_mask[s:s + k] = np.asarray(res.response_mask_BxN)[:k]
  return decode_responses(tokenizer, out_tok, out_mask, eos), out_tok, out_mask


def response_logps(model: Transformer, variables: Any, tokenizer: Any, prompts: Sequence[Any],
                   responses_NxT: np.ndarray, response_mask_NxT: np.ndarray, gen: GenerationConfig,
                   weights_NxK: np.ndarray | None = None) -> np.ndarray:
  """Summed log p(response | prompt) [N] under `model` (teacher forcing on the given token ids)."""
  p_tok, p_mask = prompt_arrays(tokenizer, prompts, gen.max_prompt_len, gen.template)
  rows, lmask = [], []
  for pt, pm_, rt, rm in zip(p_tok, p_mask, responses_NxT, response_mask_NxT):
    p = pt[pm_ > 0]
    r = rt[rm > 0]
    rows.append(np.concatenate([p, r]).astype(np.int32))
    lmask.append(np.concatenate([np.zeros(len(p), np.int32), np.ones(len(r), np.int32)]))
  L = round_up(gen.max_prompt_len, 8) + responses_NxT.shape[1]
  tokens, mask = pad_right(rows, L, pad_id(tokenizer))
  loss_mask, _ = pad_right(lmask, L, 0)

  def logp(variables, tokens, mask, loss_mask, weights):
    logits = model.apply(variables, tokens, mask, weights_BxK=weights).logits
    return ops.sequence_logprob(logits, tokens, loss_mask)

  weights = None if weights_NxK is None else np.asarray(weights_NxK, np.float32)
  out = batched_apply(jax.jit(logp), variables, {"tokens": tokens, "mask": mask, "loss_mask": loss_mask,
                                                 "weights": weights}, gen.batch_size)
  return np.asarray(out, np.float32)


def _hv_reference(hv_reference: float | Sequence[float], K: int) -> np.ndarray:
  ref = np.asarray(hv_reference, np.float64).reshape(-1)
  if ref.size == 1:
    ref = np.full(K, float(ref[0]))
  if ref.shape != (K,) or not np.all(np.isfinite(ref)):
    raise ValueError(f"eval.hv_reference: one value or K={K} finite values, got {hv_reference!r}")
  return ref


def evaluate_settings(policy: Policy | dict[str, Policy], settings: dict[str, np.ndarray], prompts: Sequence[Any],
                      tokenizer: Any,
                      scorer: Any, norm: NormStats, utility_weights_NxK: np.ndarray, *,
                      gen: GenerationConfig = GenerationConfig(), reference: tuple[Transformer, Any] | None = None,
                      pro_setting: str = "PRO", fixed_settings: Sequence[str] | None = None,
                      progress: Callable[[str], None] | None = None, keep_samples: int = 3,
                      hv_reference: float | Sequence[float] = -2.0, kl_samples: int = 1,
                      candidates: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
  """Generate, score and compare every setting (see the module docstring). Returns the report dict.

  `policy` is one policy for every setting (a weight-conditioned policy: the settings differ in the
  weights it is given), or a dict setting name -> policy (separately trained policies; their weights
  are reported but only condition a policy that is `conditioned`).
  `hv_reference`: the hypervolume's reference point on the normalized scale (one value for every
  objective, or K values), the same for every seed and setting. `reference` given: per setting
  `kl_to_reference` = KL(pi || pi_ref) estimated from `kl_samples` responses per prompt SAMPLED from
  the policy at temperature 1 (`metrics.kl_estimate`, with `kl_to_reference_sem`), and
  `logratio_to_reference` = the mean log-ratio of the evaluated (e.g. greedy) responses, which is not
  a KL. `candidates`: each prompt's candidate responses (e.g. the data's); gives the ceiling
  E_x max_y U over them (`ceilings`).
  """
  policies = policy if isinstance(policy, dict) else {name: policy for name in settings}
  missing = [n for n in settings if n not in policies]
  if missing:
    raise ValueError(f"no policy for setting(s) {missing}")
  objectives = list(scorer.objectives)
  K, N = len(objectives), len(prompts)
  uw = np.asarray(utility_weights_NxK, np.float32)
  if uw.shape != (N, K):
    raise ValueError(f"utility weights have shape {uw.shape}, expected {(N, K)}")
  ref_pt = _hv_reference(hv_reference, K)
  if candidates is not None and len(candidates) != N:
    raise ValueError(f"candidates: {len(candidates)} candidate sets for {N} prompts")
  rows: dict[str, dict[str, Any]] = {}
  per_prompt_U: dict[str, np.ndarray] = {}
  for name, w_NxK in settings.items():
    w_NxK = np.asarray(w_NxK, np.float32)
    if w_NxK.shape != (N, K):
      raise ValueError(f"setting {name!r}: weights of shape {w_NxK.shape}, expected {(N, K)}")
    if progress:
      progress(name)
    pol = policies[name]
    cond = [pol.condition(p, w, objectives) for p, w in zip(prompts, w_NxK)]
    soft_w = w_NxK if pol.soft_tokens else None
    texts, tok, msk = generate_texts(pol.model, pol.variables, tokenizer, cond, gen, soft_w)
    raw = np.asarray(scorer.score(list(prompts), texts), np.float32)
    r_norm = np.asarray(norm.apply(raw), np.float32)
    U = pm.utility(uw, r_norm)
    per_prompt_U[name] = U
    row = {"weights_mean": w_NxK.mean(0).round(4).tolist(), "utility": float(U.mean()),
           "utility_sem": float(U.std(ddof=1) / math.sqrt(N)) if N > 1 else 0.0,
           "raw": pm.objective_means(raw, objectives), "normalized": pm.objective_means(r_norm, objectives),
           "mean_length_tokens": float(msk.sum(1).mean()),
           "samples": [{"prompt": normalize_messages(cond[i])[-1]["content"], "response": texts[i]}
                       for i in range(min(keep_samples, N))]}
    if reference is not None:
      lp = response_logps(pol.model, pol.variables, tokenizer, cond, tok, msk, gen, soft_w)
      lr = response_logps(reference[0], reference[1], tokenizer, list(prompts), tok, msk, gen)
      row["logratio_to_reference"] = float(np.mean(lp - lr))
      if kl_samples > 0:  # KL(pi || pi_ref) from temperature-1 samples of pi
        sgen = dataclasses.replace(gen, greedy=False, temperature=1.0, top_k=0, top_p=1.0)
        s_cond = [c for c in cond for _ in range(kl_samples)]
        s_w = None if soft_w is None else np.repeat(soft_w, kl_samples, axis=0)
        s_prompts = [p for p in prompts for _ in range(kl_samples)]
        _, s_tok, s_msk = generate_texts(pol.model, pol.variables, tokenizer, s_cond, sgen, s_w)
        s_lp = response_logps(pol.model, pol.variables, tokenizer, s_cond, s_tok, s_msk, gen, s_w)
        s_lr = response_logps(reference[0], reference[1], tokenizer, s_prompts, s_tok, s_msk, gen)
        kl = pm.kl_estimate(s_lp, s_lr)
        row["kl_to_reference"], row["kl_to_reference_sem"] = kl["kl"], kl["sem"]
    row["policy"] = pol.name
    rows[name] = row
  fixed = list(fixed_settings) if fixed_settings is not None else [n for n in settings if n != pro_setting]
  report: dict[str, Any] = {"objectives": objectives, "num_prompts": N, "settings": rows,
                            "generation": dataclasses.asdict(gen)}
  if reference is not None and kl_samples > 0:
    report["kl"] = {"estimator": "KL(pi || pi_ref) from temperature-1 samples of pi", "samples_per_prompt": kl_samples}
  if pro_setting in rows:
    pro_U = per_prompt_U[pro_setting]
    for name in rows:
      if name != pro_setting:
        rows[name]["pro_win_rate"] = pm.win_rate(pro_U, per_prompt_U[name])
    best = max(fixed, key=lambda n: rows[n]["utility"]) if fixed else None
    report["pro"] = {"setting": pro_setting, "utility": rows[pro_setting]["utility"],
                     "best_fixed": best, "best_fixed_utility": rows[best]["utility"] if best else None,
                     "margin": rows[pro_setting]["utility"] - rows[best]["utility"] if best else None}
  ceilings: dict[str, Any] = {}
  if fixed:
    # the policy's own per-prompt best over the fixed vectors: E_x max_w U(x, y_pi(x, w))
    u_NxW = np.stack([per_prompt_U[n] for n in fixed], axis=1)
    ceilings["per_prompt_best_fixed"] = float(u_NxW.max(axis=1).mean())
    ceilings["best_fixed"] = float(u_NxW.mean(axis=0).max())
  if candidates is not None:
    flat_p = [p for p, c in zip(prompts, candidates) for _ in c]
    flat_r = [r for c in candidates for r in c]
    r_all = np.asarray(norm.apply(np.asarray(scorer.score(flat_p, flat_r), np.float32)), np.float64)
    sets, i = [], 0
    for c in candidates:
      sets.append(r_all[i:i + len(c)])
      i += len(c)
    ceilings["best_candidate"] = pm.best_candidate_utility(uw, sets)
  if ceilings:
    report["ceilings"] = ceilings
    if "pro" in report and "per_prompt_best_fixed" in ceilings:
      span = ceilings["per_prompt_best_fixed"] - ceilings["best_fixed"]
      report["pro"]["share_of_prompt_aware_gap"] = (
          (report["pro"]["utility"] - ceilings["best_fixed"]) / span if span > 0 else None)
  if fixed:
    pts = np.array([[rows[n]["normalized"][o] for o in objectives] for n in fixed], np.float64)
    front = pm.pareto_mask(pts)
    report["pareto"] = {"front": [n for n, f in zip(fixed, front) if f], "reference_point": ref_pt.tolist(),
                        "hypervolume_fixed": float(pm.hypervolume(pts[front], ref_pt))}
    if pro_setting in rows:
      p = np.array([rows[pro_setting]["normalized"][o] for o in objectives])
      dominated = bool(np.any(np.all(pts >= p, axis=1) & np.any(pts > p, axis=1)))
      both = np.vstack([pts, p])
      report["pareto"]["pro_dominated"] = dominated
      report["pareto"]["hypervolume_with_pro"] = float(pm.hypervolume(both[pm.pareto_mask(both)], ref_pt))
  report["fixed_settings"] = fixed
  return report


def add_validation_choice(report: dict[str, Any], valid_report: dict[str, Any]) -> dict[str, Any]:
  """The best fixed vector picked on a validation split (`valid_report`, the same fixed settings on
  other prompts), and its utility on the evaluation prompts: `report["pro"]["best_fixed_valid"]`,
  `best_fixed_valid_utility` (eval), `margin_valid` (PRO minus that). The eval-picked best fixed
  vector (which favours the baseline) stays in `best_fixed`."""
  fixed = [n for n in report.get("fixed_settings", []) if n in valid_report["settings"]]
  if not fixed or "pro" not in report:
    return report
  name = pm.pick_best({n: valid_report["settings"][n]["utility"] for n in fixed}, fixed)
  u = report["settings"][name]["utility"]
  report["pro"].update(best_fixed_valid=name, best_fixed_valid_utility=u, margin_valid=report["pro"]["utility"] - u,
                       valid_prompts=valid_report["num_prompts"])
  return report


def markdown_table(report: dict[str, Any]) -> str:
  objectives = report["objectives"]
  has_kl = any("kl_to_reference" in r for r in report["settings"].values())
  head = ["setting", "weights", "U (mean +- sem)"] + [f"{o} (r~)" for o in objectives] + ["PRO win rate"]
  if has_kl:
    head.append("KL to ref")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  order = sorted(report["settings"], key=lambda n: -report["settings"][n]["utility"])
  for name in order:
    r = report["settings"][name]
    w = "per prompt" if name in ("PRO", "oracle", "target") else " ".join(f"{x:.2f}" for x in r["weights_mean"])
    cells = [name, w, f"{r['utility']:.3f} +- {r['utility_sem']:.3f}"]
    cells += [f"{r['normalized'][o]:.3f}" for o in objectives]
    cells.append("-" if "pro_win_rate" not in r else f"{r['pro_win_rate']:.2f}")
    if has_kl:
      cells.append(f"{r.get('kl_to_reference', float('nan')):.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plot_utility(ax: Any, report: dict[str, Any]) -> None:
  """Bars of U (mean +- sem) per setting, best first: PRO red, the oracle green, fixed weights blue."""
  settings = report["settings"]
  order = sorted(settings, key=lambda n: -settings[n]["utility"])
  colors = ["tab:red" if n == "PRO" else "tab:green" if n == "oracle" else "tab:blue" for n in order]
  x = np.arange(len(order))
  ax.bar(x, [settings[n]["utility"] for n in order], yerr=[settings[n].get("utility_sem", 0.0) for n in order],
         color=colors, width=0.8, error_kw={"elinewidth": 0.6})
  labelled = [i for i, n in enumerate(order) if n in ("PRO", "oracle")]
  fixed = [i for i, n in enumerate(order) if n not in ("PRO", "oracle")]
  if fixed:
    labelled.append(fixed[0])  # the best fixed weights
  ax.set_xticks(sorted(labelled), [order[i] if order[i] in ("PRO", "oracle") else f"best fixed\n{order[i]}"
                                   for i in sorted(labelled)], fontsize=7)
  ax.set_ylabel("U = sum_k w*_k r~_k (true weights)")
  ax.set_title(f"U per setting ({len(fixed)} fixed weight vectors)", fontsize=9)
  ax.grid(alpha=0.3, axis="y")


def plot_front(report: dict[str, Any], path: str | os.PathLike) -> None:
  """PNG: mean r~ of every fixed-weight setting (front highlighted) with PRO's point, per objective pair,
  and U per setting (bars, best first; the metric PRO is judged on)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  objectives = report["objectives"]
  fixed = report.get("fixed_settings", [])
  front = set(report.get("pareto", {}).get("front", []))
  pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
  fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(4.2 * (len(pairs) + 1), 4), squeeze=False)
  _plot_utility(axes[0][-1], report)
  for ax, (i, j) in zip(axes[0], pairs):
    oi, oj = objectives[i], objectives[j]
    for n in fixed:
      r = report["settings"][n]["normalized"]
      ax.scatter(r[oi], r[oj], c="tab:blue" if n in front else "lightgray", s=22, zorder=2)
    pro = report.get("pro")
    if pro:
      r = report["settings"][pro["setting"]]["normalized"]
      ax.scatter(r[oi], r[oj], c="tab:red", marker="*", s=180, zorder=3, label="PRO")
    for extra, color in (("oracle", "tab:green"),):
      if extra in report["settings"]:
        r = report["settings"][extra]["normalized"]
        ax.scatter(r[oi], r[oj], c=color, marker="^", s=70, zorder=3, label=extra)
    ax.set_xlabel(f"{oi} (normalized)")
    ax.set_ylabel(f"{oj} (normalized)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(loc="best", fontsize=8)
  fig.suptitle("fixed-weight policies (blue: Pareto front, gray: dominated) and PRO; right: U per setting")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  files.write_bytes(path, buf.getvalue())  # local or gs://


def plot_utility(report: dict[str, Any]) -> bytes:
  """PNG bytes of a bar chart: U (mean +- sem) per setting, PRO and the oracle highlighted."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = sorted(report["settings"], key=lambda n: -report["settings"][n]["utility"])
  u = [report["settings"][n]["utility"] for n in names]
  err = [report["settings"][n].get("utility_sem", 0.0) for n in names]
  colors = ["tab:red" if n == "PRO" else "tab:green" if n == "oracle" else "tab:blue" for n in names]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(names) + 1.5), 3.6))
  ax.bar(range(len(names)), u, yerr=err, color=colors, capsize=2)
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("U (true weights)")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def log_report(report: dict[str, Any], out_dir: str | os.PathLike, images: dict[str, bytes],
               wandb_project: str | None = None) -> None:
  """The report's figures to TensorBoard (`out_dir/tb`, replaced) and, with `wandb_project`, W&B:
  scalars report/U/<setting> (other characters than [A-Za-z0-9_./-] as "_"), report/margin, report/hypervolume_*; images report/<name>."""
  import tempfile

  from tensorboardX import SummaryWriter

  # TensorBoard tags keep [A-Za-z0-9_./-]: "fixed(0.50,0.50,0.00)" -> "fixed_0.50_0.50_0.00_"
  scalars = {"U/" + re.sub(r"[^A-Za-z0-9_./-]", "_", n): float(r["utility"]) for n, r in report["settings"].items()}
  pro, pareto = report.get("pro") or {}, report.get("pareto") or {}
  scalars.update({k: float(v) for k, v in (("margin", pro.get("margin")),
                                           ("hypervolume_fixed", pareto.get("hypervolume_fixed")),
                                           ("hypervolume_with_pro", pareto.get("hypervolume_with_pro")))
                  if isinstance(v, (int, float))})
  arrays = {name: _png_array(png) for name, png in images.items()}
  tb = files.join(out_dir, "tb")
  with tempfile.TemporaryDirectory(prefix="pro_jax_report_tb_") as local:
    writer = SummaryWriter(local)
    for tag, v in scalars.items():
      writer.add_scalar(f"report/{tag}", v, 0)
    for name, arr in arrays.items():
      writer.add_image(f"report/{name}", arr, 0, dataformats="HWC")
    writer.close()
    if files.as_path(tb).exists():
      files.as_path(tb).rmtree()
    files.upload(local, tb)
  if wandb_project:
    import wandb  # type: ignore[import-not-found]

    run = wandb.init(project=wandb_project, job_type="eval", name=f"report-seed{report.get('seed', 0)}")
    run.log({**{f"report/{k}": v for k, v in scalars.items()},
             **{f"report/{n}": wandb.Image(a) for n, a in arrays.items()}})
    run.finish()


def _png_array(png: bytes):
  import matplotlib.image

  arr = matplotlib.image.imread(io.BytesIO(png), format="png")
  return (np.asarray(arr)[..., :3] * 255).astype(np.uint8)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, title: str = "PRO evaluation",
                 wandb_project: str | None = None) -> dict[str, str]:
  """report.json, report.md, front.png and utility.png in `out_dir` (local or gs://; each file written
  whole), and the figures to TensorBoard (`out_dir/tb`) / W&B (`log_report`)."""
  paths = {k: files.join(out_dir, f) for k, f in (("json", "report.json"), ("md", "report.md"),
                                                    ("png", "front.png"), ("utility", "utility.png"))}
  if jax.process_index() != 0:  # multi-host: one writer of the shared files
    return paths
  files.write_text(paths["json"], json.dumps(report, indent=2, sort_keys=True, default=float))
  md = [f"# {title}", "", f"{report['num_prompts']} held-out prompts; objectives: {', '.join(report['objectives'])}.",
        "U = sum_k w*_k(x) r~_k(x, y) with each prompt's true weights; r~ = normalized rewards.", "",
        markdown_table(report), ""]
  if report.get("pro") and report["pro"].get("best_fixed"):
    p = report["pro"]
    md.append(f"PRO: U = {p['utility']:.4f}; best fixed weights ({p['best_fixed']}): U = "
              f"{p['best_fixed_utility']:.4f}; margin {p['margin']:+.4f}.")
  if report.get("pareto"):
    pa = report["pareto"]
    md.append(f"Fixed-weight Pareto front: {len(pa['front'])} of {len(report['fixed_settings'])} settings; "
              f"hypervolume {pa['hypervolume_fixed']:.4f}"
              + (f", with PRO {pa['hypervolume_with_pro']:.4f}; PRO dominated: {pa['pro_dominated']}"
                 if "hypervolume_with_pro" in pa else "") + ".")
  md.append("")
  md.append("![front](front.png)")
  md.append("")
  md.append("![U per setting](utility.png)")
  files.write_text(paths["md"], "\n".join(md) + "\n")
  plot_front(report, paths["png"])
  utility_png = plot_utility(report)
  files.write_bytes(paths["utility"], utility_png)
  log_report(report, out_dir, {"front": files.as_path(paths["png"]).read_bytes(), "utility": utility_png},
             wandb_project)
  return paths


# ---------------------------------------------------------------------------------------------
# The eval stage


def _fixed_name(w: np.ndarray) -> str:
  return "fixed(" + ",".join(f"{x:.2f}" for x in w) + ")"


def run_eval(ctx: Context) -> dict[str, Any]:
  """PRO against fixed weights on held-out prompts.

  A weight-conditioned policy (`policy.pro.loss="ric"`) is one model: PRO = the adapter's f(x) in its
  prompts, each fixed setting = one vector of the `eval.grid_step` simplex grid, plus the oracle (the
  true weights, when the data has them). Unconditioned policies (dpo / wdpo / modpo / ppo / sft) are
  one model per weighting: list their run directories (subdirectories of the workdir, each trained
  with `--config.policy.pro.name=...` and its own `weights_source`) in `eval.policies`; the run trained
  with the adapter's weights is PRO, those with fixed / uniform weights are the fixed settings.
  """
  ecfg = ctx.cfg.eval
  runs = list(ecfg.policies) or [ctx.cfg.policy.pro.name]
  examples = ctx.eval[:ecfg.max_prompts] if ecfg.max_prompts else ctx.eval
  prompts = [ex["prompt"] for ex in examples]
  N, K = len(examples), ctx.K
  true_w = true_weights(examples)
  target_w = targets_for(ctx, examples, ctx.cfg.adapter.pro.tau) if all(ex.get("chosen") for ex in examples) else None
  if ecfg.utility_weights == "true" and true_w is not None:
    uw, uw_name = true_w, "true"
  elif target_w is not None:
    uw, uw_name = target_w, "target"
  else:
    raise ValueError("eval needs utility weights: the examples' true weights or a preferred response per prompt")

  def load_policy(run: str) -> tuple[Policy, dict]:
    meta = load_checkpoint(ctx.path(run)).extra or {}
    src = load_source(f"checkpoint:{ctx.path(run)}")
    model = Transformer(src.config.replace(value_head=False))
    mode = meta.get("conditioning")
    return Policy(run, model, {"params": src.params}, conditioned=mode in ("text", "soft", "rewards"),
                  soft_placeholder=meta.get("soft_placeholder", ""),
                  soft_tokens=src.config.weight_tokens if mode == "soft" else 0,
                  reward_map=meta.get("reward_map") if mode == "rewards" else None), meta

  settings: dict[str, np.ndarray] = {}
  policies: dict[str, Policy] = {}
  fixed_names: list[str] = []
  first, _ = load_policy(runs[0])
  conditioned = first.conditioned
  if conditioned:
    if len(runs) > 1:
      raise ValueError("eval.policies: a weight-conditioned policy is evaluated on its own (one model, all weights)")
    settings["PRO"] = adapter_weights(ctx, examples)
    for w in simplex_grid(K, ecfg.grid_step):
      settings[_fixed_name(w)] = np.broadcast_to(w, (N, K)).astype(np.float32)
      fixed_names.append(_fixed_name(w))
    if ecfg.oracle and true_w is not None:
      settings["oracle"] = true_w
    policies = {name: first for name in settings}
  else:
    for run in runs:
      pol, meta = load_policy(run) if run != runs[0] else (first, load_checkpoint(ctx.path(run)).extra or {})
      src = str(meta.get("weights_source", "uniform"))
      if src == "adapter":
        name, w = "PRO", adapter_weights(ctx, examples)
      elif src == "target":
        name, w = "target", target_w if target_w is not None else np.full((N, K), 1.0 / K, np.float32)
      else:
        w = resolve_example_weights(src, N, K)
        name = _fixed_name(w[0])
        fixed_names.append(name)
      if name in settings:
        raise ValueError(f"eval.policies: two runs are setting {name!r} ({run})")
      settings[name], policies[name] = w, pol
  ref = None
  if ecfg.kl:
    ref_src = load_source(ctx.source(ctx.cfg.policy.pro.reference))
    ref = (Transformer(ref_src.config.replace(value_head=False, lora=None)), {"params": ref_src.params})
  gen = GenerationConfig(max_prompt_len=ctx.cfg.policy.pro.max_prompt_len if conditioned else ctx.cfg.data.max_prompt_len,
                           max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size, greedy=ecfg.greedy,
                           temperature=ecfg.temperature, seed=int(ctx.cfg.seed), template=ctx.cfg.data.template)
  bar = tqdm(total=len(settings), desc="eval", unit="setting", disable=None)

  def progress(name):
    bar.set_postfix_str(name)
    bar.update(1)

  candidates = [list(ex["responses"]) for ex in examples] if all(len(ex.get("responses", [])) for ex in examples) \
      else None
  report = evaluate_settings(policies, settings, prompts, ctx.tokenizer, ctx.scorer, ctx.norm, uw, gen=gen,
                             reference=ref, fixed_settings=fixed_names, progress=progress,
                             hv_reference=tuple(ecfg.hv_reference), kl_samples=int(ecfg.kl_samples),
                             candidates=candidates)
  bar.close()
  # the best fixed vector picked on the validation split (prompts disjoint from the eval prompts)
  valid = ctx.valid[:ecfg.max_valid_prompts] if ecfg.max_valid_prompts else ctx.valid
  if valid and fixed_names and "PRO" in settings:
    v_true = true_weights(valid)
    v_uw = v_true if uw_name == "true" and v_true is not None else targets_for(ctx, valid, ctx.cfg.adapter.pro.tau)
    v_settings = {n: np.broadcast_to(settings[n][0], (len(valid), K)).astype(np.float32) for n in fixed_names}
    say(f"eval: picking the best fixed vector on {len(valid)} validation prompts")
    v_report = evaluate_settings({n: policies[n] for n in fixed_names}, v_settings, [ex["prompt"] for ex in valid],
                                 ctx.tokenizer, ctx.scorer, ctx.norm, v_uw, gen=gen, fixed_settings=fixed_names,
                                 hv_reference=tuple(ecfg.hv_reference))
    add_validation_choice(report, v_report)
  report["utility_weights"] = uw_name
  seen = {json.dumps(normalize_messages(ex["prompt"]), sort_keys=True) for ex in ctx.train}
  report["eval_prompts_seen_in_training"] = sum(json.dumps(normalize_messages(p), sort_keys=True) in seen
                                                for p in prompts)
  if target_w is not None and "PRO" in settings:
    report["adapter"] = evaluate_adapter(settings["PRO"], target_w)
  if ctx.task_config is not None and fixed_names and conditioned:
    steps = int(round(1.0 / ecfg.grid_step))
    res = synthetic.oracle_vs_fixed(examples, (ctx.norm.loc, ctx.norm.scale), grid_steps=steps)
    report["theorem"] = {"oracle_candidates": res["oracle"], "best_fixed_candidates": res["best_fixed"],
                         "per_prompt_best": res["theorem"]["per_prompt_best"], "gap": res["theorem"]["gap"]}
  report["seed"] = int(ctx.cfg.seed)
  write_report(report, ctx.path("report"), title=f"PRO evaluation (seed {int(ctx.cfg.seed)})",
               wandb_project=ctx.cfg.policy.log.wandb_project or None)
  return report
