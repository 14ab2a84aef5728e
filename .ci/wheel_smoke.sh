#!/usr/bin/env bash
# The packaged wheel, as a user gets it: build it, install it into a fresh venv outside the repository,
# and run `pro-jax` from there (version, help, a tiny demo end to end, generate on that run).
# Cost: ~5 min on 2 cores, most of it pip downloading the dependencies; the demo at toy size ~1-2 min.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}           # makes the clean venv
BUILD_PY=${BUILD_PY:-.venv/bin/python}  # has `build` (the test extras)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$BUILD_PY" -m build --wheel --outdir "$tmp/dist" . > "$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "$tmp"/dist/pro_jax-*.whl
cd "$tmp"  # outside the repository: the installed package alone must do
export JAX_PLATFORMS=cpu
"$tmp/venv/bin/pro-jax" --version
"$tmp/venv/bin/pro-jax" demo --help > /dev/null
tiny=(--config.task.n_train=64 --config.task.n_eval=16 --config.model.d_model=32 --config.model.mlp_dim=64
      --config.model.n_layers=1 --config.eval.grid_step=0.5 --config.eval.max_new_tokens=8
      --config.eval.batch_size=16)
for stage in sft adapter policy; do
  tiny+=("--config.$stage.total_steps=4" "--config.$stage.batch_size=8" "--config.$stage.optim.warmup_steps=1"
         "--config.$stage.log.progress=False")
done
"$tmp/venv/bin/pro-jax" demo --workdir "$tmp/demo" "${tiny[@]}" > "$tmp/demo.log" 2>&1 || { tail -50 "$tmp/demo.log"; exit 1; }
test -s "$tmp/demo/report/report.md"
"$tmp/venv/bin/pro-jax" generate --workdir "$tmp/demo" --prompt "what color is the zorb ?" --max-new-tokens 8
echo "wheel smoke test: ok"
