#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its node.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE [--queued [--qr-name ID]] [--yes] [--project ID] [--dry-run]

  gcloud compute tpus tpu-vm delete NAME --zone=ZONE
  gcloud compute tpus queued-resources delete ID --zone=ZONE --force     (with --queued)
Deleting stops the billing; the VM's disks (and a local workdir and the logs on them) are lost,
a gs:// workdir stays.

  --yes      do not ask for confirmation (gcloud --quiet)
  --dry-run  print the gcloud command (one line, '+ ' prefix) and run nothing
"

script_flag() {
  case $1 in
    --yes) _set YES bool ;;
    *) flags_queued "$1" ;;
  esac
}

parse_args "$@"
validate_common
do_delete "$YES"
