#!/usr/bin/env bash
# The paper setting 'helpful_assistant' (experiments/helpful_assistant.py) on a Cloud TPU VM: every PRO stage in order on
# all workers (or here with --local). --help for the options; --dry-run prints the command.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=SCRIPTDIR/launch_common.sh
source "$_here/launch_common.sh"

# shellcheck disable=SC2034  # read by launch_common.sh
SETTING=helpful_assistant
# shellcheck disable=SC2034
DEFAULT_LOSS=ppo
# shellcheck disable=SC2034
DEFAULT_STAGES=sft,adapter,policy,eval
launch_setting "$@"
