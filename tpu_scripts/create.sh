#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), directly or through a queued resource.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME
                 [--spot | --preemptible] [--reserved] [--queued [--qr-name ID]]
                 [--poll SECONDS] [--wait-timeout SECONDS] [--project ID] [--dry-run]

Create the TPU VM NAME:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME
With --queued, request it as a queued resource (ID, default NAME-qr, holding the node NAME) and
wait until the request is ACTIVE:
  gcloud compute tpus queued-resources create ID --zone=ZONE --node-id=NAME
      --accelerator-type=TYPE --runtime-version=RUNTIME [--spot]
  gcloud compute tpus queued-resources describe ID --zone=ZONE  (every --poll seconds, default 30)

  --accelerator-type  e.g. v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v5p-16, v6e-8
  --version           TPU runtime image: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
                      v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  --spot              spot capacity (cheaper, can be preempted at any time; not restartable)
  --preemptible       the older preemptible kind (not with --queued)
  --reserved          use the project's reservation
  --dry-run           print the gcloud commands (one per line, '+ ' prefix) and run nothing
"

script_flag() { flags_create "$1"; }

parse_args "$@"
validate_common
validate_create
do_create
