"""`make demo` / `pro-jax demo`: the whole PRO pipeline on the embedded synthetic task.

    report = run_demo(load_config("demo"), "runs/demo")

1. data: `generate_task` (train / eval), the task's own word-level tokenizer;
2. rewards: the programmatic objectives (`SyntheticRewards`), z-score statistics over every training
   response (`W/norm.json`);
3. `sft`: the reference policy, trained from scratch on every candidate response;
4. `adapter`: targets w*(x) = softmax(r~(x, y_w) / tau), features = the frozen reference's
   mean-pooled prompt states, KL loss; held-out KL / top-1 / Spearman against the eval targets;
5. `policy`: weight-conditioned SFT (RiC-style) from the reference;
6. `eval`: on held-out prompts, the policy conditioned on PRO's f(x), on every fixed weight vector of
   a simplex grid, and on the hidden true weights (oracle, for reference); U = sum_k w*_k(x) r~_k
   with the true weights; report.md / report.json / front.png, and a table on the console.
"""

from __future__ import annotations

from typing import Any

from pro_jax.stages import evaluate
from pro_jax.stages.pipeline import run_pipeline, say


def _top(report: dict, n: int) -> dict:
  """The report with PRO, the oracle and the n best fixed settings (the console table)."""
  names = sorted(report["fixed_settings"], key=lambda s: -report["settings"][s]["utility"])[:n]
  keep = [s for s in ("PRO", "oracle") if s in report["settings"]] + names
  return dict(report, settings={k: report["settings"][k] for k in keep})


def run_demo(cfg: Any, workdir: str, *, existing: str = "auto", table_rows: int = 100) -> dict[str, Any]:
  report = run_pipeline(cfg, workdir, existing=existing)
  say("PRO against every fixed weight vector (held-out prompts, U with the true weights):\n"
      + evaluate.markdown_table(_top(report, table_rows)))
  p = report.get("pro")
  if not p or not p.get("best_fixed"):
    return report
  say(f"PRO U = {p['utility']:.4f} vs best fixed {p['best_fixed']} U = {p['best_fixed_utility']:.4f} "
      f"(margin {p['margin']:+.4f}); report in {workdir}/report; timings {report['timings_s']}")
  return report
