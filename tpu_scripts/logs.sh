#!/usr/bin/env bash
# Stream a run's log from worker 0, or from all workers with a [hostname] prefix on each line.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE [--run-name NAME | --stage STAGE] [--worker 0|N|all]
               [--lines 100] [--no-follow] [--progress] [--project ID] [--dry-run]

  gcloud compute tpus tpu-vm ssh NAME --worker=W --command='tail -n LINES -F ~/pro_jax_logs/RUN.log'
With --worker=all every line is prefixed with the worker's hostname. Ctrl-C stops streaming
(the run continues).

  --run-name   log name given to launch.sh (default: the stage; default stage: train)
  --worker     0 (default), a worker index, or all
  --lines      lines of history to show first (default 100)
  --no-follow  print and exit instead of following
  --progress   only the progress lines ('DATE TIME [stage] workdir ... / step N/M ... ETA ... / done: ...',
               written when the output is not a terminal), without warnings and library logs
  --dry-run    print the gcloud command (one line, '+ ' prefix) and run nothing
"

script_flag() {
  case $1 in
    --run-name) _set RUN_NAME value ;;
    --stage) _set STAGE value ;;
    --worker) _set WORKER value ;;
    --lines) _set LINES value ;;
    --no-follow) _set NO_FOLLOW bool ;;
    --progress) _set PROGRESS bool ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
validate_common
WORKER=${WORKER:-0}
[[ $WORKER =~ ^([0-9]+|all)$ ]] || usage_error "--worker '$WORKER': a worker index or all"
[[ $LINES =~ ^[0-9]+$ ]] || usage_error "--lines '$LINES' must be a number"
RUN_NAME=${RUN_NAME:-${STAGE:-train}}
[[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--run-name '$RUN_NAME': letters, digits, . _ - only"

follow=-F
((NO_FOLLOW)) && follow=""
remote_cmd="tail -n $LINES${follow:+ $follow} ~/$LOG_DIR/$RUN_NAME.log"
if ((PROGRESS)); then
  remote_cmd+=" | grep --line-buffered -E '^[0-9-]+ [0-9:]+ \\[[A-Za-z0-9_.:-]+\\] '"
fi
if [[ $WORKER == all ]]; then
  remote_cmd+=" | sed -u \"s/^/[\$(hostname)] /\""
fi
ssh_workers "$WORKER" "$remote_cmd"
