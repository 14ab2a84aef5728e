#!/usr/bin/env bash
# The paper setting 'ultrafeedback_aspects' (experiments/ultrafeedback_aspects.py) on a Cloud TPU VM: every PRO stage in order on
# all workers (or here with --local). --help for the options; --dry-run prints the command.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=SCRIPTDIR/launch_common.sh
source "$_here/launch_common.sh"

# shellcheck disable=SC2034  # read by launch_common.sh
SETTING=ultrafeedback_aspects
# shellcheck disable=SC2034
DEFAULT_LOSS=wdpo
# shellcheck disable=SC2034
DEFAULT_STAGES=sft,rm,adapter,policy,eval
launch_setting "$@"
