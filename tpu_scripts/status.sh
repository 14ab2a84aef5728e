#!/usr/bin/env bash
# Print the state of a TPU VM (READY, PREEMPTED, ...) or of a queued resource (ACTIVE, SUSPENDED, ...).
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE [--queued [--qr-name ID]] [--project ID] [--dry-run]

  gcloud compute tpus tpu-vm describe NAME --zone=ZONE --format='value(state)'
  gcloud compute tpus queued-resources describe ID --zone=ZONE --format='value(state.state)'
Prints the state on stdout (NOT_FOUND when it does not exist).
"

script_flag() { flags_queued "$1"; }

parse_args "$@"
validate_common
get_state
((DRY_RUN)) || printf '%s\n' "$STATE"
[[ $STATE != ERROR ]]
