#!/usr/bin/env bash
# Install Python >= 3.11 (uv-managed) and a virtual environment on every worker of a TPU VM.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE [--python 3.11] [--venv DIR] [--project ID] [--dry-run]

On all workers (gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...): install uv
(pip --user, else its install script), 'uv python install 3.11' (TPU images ship Python 3.10),
and create the venv ~/DIR (default ~/pro_jax_venv). Idempotent. pro-jax itself is installed
into the venv by ship.sh (pip install -e '.[tpu]' of the shipped code).

  --python   Python version for the venv (>= 3.11; default 3.11)
  --venv     venv directory relative to the remote home (default pro_jax_venv)
  --dry-run  print the gcloud commands (one per line, '+ ' prefix) and run nothing
"

script_flag() { flags_setup "$1"; }

parse_args "$@"
validate_common
validate_setup
do_setup
