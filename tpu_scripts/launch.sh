#!/usr/bin/env bash
# Launch a pro-jax stage on every worker, in the background, logging to a file on each worker.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE --stage STAGE --workdir DIR [--config FILE]
                 [--run-name NAME] [--env KEY=VALUE ...] [--remote-dir DIR] [--venv DIR]
                 [--project ID] [--dry-run] [-- EXTRA_ARGS ...]

Runs on all workers (gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...):
  cd ~/pro_jax; nohup env PYTHONUNBUFFERED=1 [KEY=VALUE...] ~/pro_jax_venv/bin/pro-jax STAGE
      [--config FILE] --workdir DIR EXTRA_ARGS... >> ~/pro_jax_logs/RUN.log 2>&1 &
and records the pid in ~/pro_jax_logs/RUN.pid (a second launch while it runs is refused).
Every worker runs the same command: on a pod slice the processes find each other through
jax.distributed.initialize() (arguments detected from the TPU metadata).

  --stage      pro-jax subcommand: demo, sft, rm, adapter, policy, eval, generate, export, train, aot
  --workdir    run directory: gs://BUCKET/PATH (shared by all workers; checkpoints, metrics.jsonl,
               TensorBoard) or a path on each worker's disk (single host only; lost with the VM)
  --config     a config name (demo, tiny_lm, tiny_dpo, llama2_7b_dpo) or a file relative to the
               shipped code (e.g. experiments/helpful_assistant.py:policy)
  --run-name   name of the log / pid files (default: the stage)
  --env        extra environment variable for the run (repeatable)
  --           everything after it goes to 'pro-jax STAGE', e.g. -- --config.optim.lr=3e-4
  --dry-run    print the gcloud command (one line, '+ ' prefix) and run nothing
"

ACCEPTS_PASSTHROUGH=1
script_flag() { flags_launch "$1"; }

parse_args "$@"
validate_common
validate_launch
do_launch
