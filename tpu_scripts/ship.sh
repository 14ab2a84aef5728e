#!/usr/bin/env bash
# Ship the code (a git archive of a commit) to every worker and install it into the venv.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE [--ref HEAD] [--extras tpu] [--no-install]
               [--tarball PATH] [--remote-dir DIR] [--venv DIR] [--project ID] [--dry-run]

  git archive --format=tar.gz --output=PATH REF      (committed code only; default PATH
                                                    \${TMPDIR:-/tmp}/pro_jax-code.tar.gz)
  gcloud compute tpus tpu-vm scp PATH NAME:pro_jax-code.tar.gz --worker=all
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command='unpack into ~/DIR (default
      ~/pro_jax); uv pip install -e \"\$HOME/pro_jax[EXTRAS]\" into the venv'

  --ref         commit / branch / tag to ship (default HEAD; uncommitted changes are not shipped)
  --extras      pip extras to install (default tpu = jax[tpu]; e.g. tpu,wandb)
  --no-install  only unpack
  --dry-run     print the commands (one per line, '+ ' prefix) and run nothing
"

script_flag() { flags_ship "$1"; }

parse_args "$@"
validate_common
validate_ship
do_ship
