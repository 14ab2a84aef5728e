# shellcheck shell=bash
# shellcheck disable=SC2034  # the option variables below are read by the scripts sourcing this
# Shared code for tpu_scripts/*.sh: argument parsing, --dry-run, and the gcloud command builders.
# Sourced by the scripts, never run on its own.
#
# Every gcloud (and local git) command goes through `run`, which prints it as `+ <command>`, with
# each argument shell-quoted, to stdout under --dry-run (and runs nothing), or to stderr before
# running it. Dry runs need no gcloud, no network and no external program at all.
#
# Remote paths (code, venv, logs) are relative to the remote user's home directory.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: tpu_scripts need bash >= 4.4 (this is ${BASH_VERSION}); on macOS: brew install bash" >&2
  exit 1
fi

SCRIPT_NAME=${0##*/}
_common_dir=${BASH_SOURCE[0]%/*}
[[ $_common_dir == "${BASH_SOURCE[0]}" ]] && _common_dir=.
TPU_SCRIPTS_DIR=$(cd "$_common_dir" && pwd)
REPO_ROOT=${TPU_SCRIPTS_DIR%/*}

# ---- options (defaults) ----------------------------------------------------------------------
DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""
# create
ACCELERATOR_TYPE=""
VERSION=""
SPOT=0
PREEMPTIBLE=0
RESERVED=0
QUEUED=0
QR_NAME=""            # queued-resource id; default "<name>-qr"
POLL=30               # seconds between state checks
WAIT_TIMEOUT=0        # seconds to wait for a queued resource to become ACTIVE; 0 = no limit
# setup / ship
PYTHON_VERSION=3.11
REMOTE_DIR=pro_jax
VENV_DIR=pro_jax_venv
EXTRAS=tpu
REF=HEAD
TARBALL=""            # local tarball path; default ${TMPDIR:-/tmp}/pro_jax-code.tar.gz
NO_INSTALL=0
# launch / logs
STAGE=""
CONFIG=""
WORKDIR=""
RUN_NAME=""           # log / pid file name on the workers; default = stage
ENV_VARS=()
WORKER=""
LINES=100
NO_FOLLOW=0
PROGRESS=0
# delete
YES=0
# resume
WATCH=0
MAX_POLLS=0
MAX_RESTARTS=0
ASSUME_STATE=""
# arguments after `--` (launch / resume: extra `pro-jax <stage>` arguments such as --config.x=y)
PASSTHROUGH=()
ACCEPTS_PASSTHROUGH=0

LOG_DIR=pro_jax_logs
REMOTE_TARBALL=pro_jax-code.tar.gz

# ---- messages --------------------------------------------------------------------------------
die() {
  echo "error: $*" >&2
  exit 1
}

usage_error() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "run '$SCRIPT_NAME --help' for usage" >&2
  exit 2
}

note() { echo "# $*" >&2; }

print_usage() { printf '%s\n' "$USAGE"; }

# ---- quoting and running ---------------------------------------------------------------------
# quote ARG: ARG unchanged when it holds only safe characters, else single-quoted ('\'' for ').
quote() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# format_cmd ARGS...: one line a POSIX shell would split back into exactly ARGS.
format_cmd() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(quote "$a")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: print (dry run) or echo to stderr and execute.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(format_cmd "$@")"
  else
    printf '+ %s\n' "$(format_cmd "$@")" >&2
    "$@"
  fi
}

# ---- argument parsing ------------------------------------------------------------------------
# Scripts define `script_flag FLAG` setting FLAG_VAR (variable name) and FLAG_KIND
# (bool | value | array) for the options they accept, returning 1 for unknown ones; the groups
# below are shared between scripts.
FLAG_VAR=""
FLAG_KIND=""

_set() { FLAG_VAR=$1 FLAG_KIND=$2; }

flags_common() {
  case $1 in
    --name) _set NAME value ;;
    --zone) _set ZONE value ;;
    --project) _set PROJECT value ;;
    --dry-run) _set DRY_RUN bool ;;
    *) return 1 ;;
  esac
}

flags_queued() {
  case $1 in
    --queued) _set QUEUED bool ;;
    --qr-name) _set QR_NAME value ;;
    *) return 1 ;;
  esac
}

flags_create() {
  case $1 in
    --accelerator-type) _set ACCELERATOR_TYPE value ;;
    --version) _set VERSION value ;;
    --spot) _set SPOT bool ;;
    --preemptible) _set PREEMPTIBLE bool ;;
    --reserved) _set RESERVED bool ;;
    --poll) _set POLL value ;;
    --wait-timeout) _set WAIT_TIMEOUT value ;;
    *) flags_queued "$1" ;;
  esac
}

flags_remote() {
  case $1 in
    --remote-dir) _set REMOTE_DIR value ;;
    --venv) _set VENV_DIR value ;;
    *) return 1 ;;
  esac
}

flags_setup() {
  case $1 in
    --python) _set PYTHON_VERSION value ;;
    *) flags_remote "$1" ;;
  esac
}

flags_ship() {
  case $1 in
    --ref) _set REF value ;;
    --tarball) _set TARBALL value ;;
    --extras) _set EXTRAS value ;;
    --no-install) _set NO_INSTALL bool ;;
    *) flags_remote "$1" ;;
  esac
}

flags_launch() {
  case $1 in
    --stage) _set STAGE value ;;
    --config) _set CONFIG value ;;
    --workdir) _set WORKDIR value ;;
    --run-name) _set RUN_NAME value ;;
    --env) _set ENV_VARS array ;;
    *) flags_remote "$1" ;;
  esac
}

parse_args() {
  local arg flag value has_value
  while (($#)); do
    arg=$1
    shift
    has_value=0
    case $arg in
      -h | --help)
        print_usage
        exit 0
        ;;
      --)
        ((ACCEPTS_PASSTHROUGH)) || usage_error "unexpected '--' (this script takes no stage arguments)"
        PASSTHROUGH=("$@")
        return 0
        ;;
      --*=*)
        flag=${arg%%=*}
        value=${arg#*=}
        has_value=1
        ;;
      --*) flag=$arg ;;
      *) usage_error "unexpected argument '$arg'" ;;
    esac
    FLAG_VAR="" FLAG_KIND=""
    flags_common "$flag" || script_flag "$flag" || usage_error "unknown option '$flag'"
    case $FLAG_KIND in
      bool)
        ((has_value)) && usage_error "option $flag takes no value"
        printf -v "$FLAG_VAR" '%s' 1
        ;;
      value | array)
        if ((!has_value)); then
          if (($# == 0)) || [[ $1 == --* ]]; then
            usage_error "option $flag needs a value"
          fi
          value=$1
          shift
        fi
        if [[ $FLAG_KIND == value ]]; then
          printf -v "$FLAG_VAR" '%s' "$value"
        else
          eval "$FLAG_VAR+=(\"\$value\")"
        fi
        ;;
    esac
  done
}

# require VALUE FLAG: usage error (exit 2) when VALUE is empty.
require() {
  [[ -n $1 ]] || usage_error "missing required option $2"
}

# ---- validation (all before any command runs) ------------------------------------------------
validate_common() {
  require "$NAME" --name
  require "$ZONE" --zone
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    usage_error "--name '$NAME': use lowercase letters, digits and '-', starting with a letter"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || usage_error "--zone '$ZONE' is not a zone (e.g. us-central2-b)"
  if [[ -n $PROJECT && ! $PROJECT =~ ^[a-z][-a-z0-9:.]*$ ]]; then
    usage_error "--project '$PROJECT' is not a project id"
  fi
  if ((QUEUED)) && [[ -z $QR_NAME ]]; then
    QR_NAME="$NAME-qr"
  fi
  if ((QUEUED)) && [[ ! $QR_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    usage_error "--qr-name '$QR_NAME': use lowercase letters, digits and '-'"
  fi
  return 0
}

_is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

validate_create() {
  require "$ACCELERATOR_TYPE" --accelerator-type
  require "$VERSION" --version
  [[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    usage_error "--accelerator-type '$ACCELERATOR_TYPE' is not a TPU type (e.g. v4-32, v5litepod-16, v5p-16, v6e-8)"
  [[ $VERSION =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--version '$VERSION' is not a runtime version"
  ((SPOT && PREEMPTIBLE)) && usage_error "--spot and --preemptible are exclusive (spot is the newer kind)"
  ((QUEUED && PREEMPTIBLE)) && usage_error "queued resources take --spot, not --preemptible"
  _is_uint "$POLL" || usage_error "--poll '$POLL' must be a whole number of seconds"
  _is_uint "$WAIT_TIMEOUT" || usage_error "--wait-timeout '$WAIT_TIMEOUT' must be a whole number of seconds"
  return 0
}

validate_remote() {
  local d
  for d in "$REMOTE_DIR" "$VENV_DIR"; do
    [[ $d =~ ^[A-Za-z0-9._][A-Za-z0-9._/-]*$ ]] ||
      usage_error "remote path '$d' must be relative to the home directory (letters, digits, . _ - /)"
  done
  return 0
}

validate_setup() {
  validate_remote
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || usage_error "--python '$PYTHON_VERSION' is not a Python 3 version"
  [[ $PYTHON_VERSION =~ ^3\.([0-9]+) ]]
  if ((BASH_REMATCH[1] < 11)); then
    usage_error "--python $PYTHON_VERSION: pro-jax needs Python >= 3.11"
  fi
  return 0
}

validate_ship() {
  validate_remote
  [[ $EXTRAS =~ ^[a-z0-9_,-]*$ ]] || usage_error "--extras '$EXTRAS': a comma-separated list like tpu,wandb"
  [[ -n $REF ]] || usage_error "--ref is empty"
  if [[ -z $TARBALL ]]; then
    TARBALL="${TMPDIR:-/tmp}/pro_jax-code.tar.gz"
  fi
  return 0
}

validate_launch() {
  validate_remote
  require "$STAGE" --stage
  require "$WORKDIR" --workdir
  [[ $STAGE =~ ^[a-z][a-z0-9_-]*$ ]] || usage_error "--stage '$STAGE' is not a pro-jax subcommand name"
  [[ -z $RUN_NAME ]] && RUN_NAME=$STAGE
  [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--run-name '$RUN_NAME': letters, digits, . _ - only"
  local e
  for e in "${ENV_VARS[@]}"; do
    [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$e' must look like NAME=VALUE"
  done
  if [[ $WORKDIR != gs://* ]]; then
    note "warning: --workdir '$WORKDIR' is on each worker's own disk: a multi-host run needs a shared" \
      "gs:// workdir, and a local one is lost when the TPU is preempted or deleted"
  fi
  return 0
}

# ---- gcloud argument pieces ------------------------------------------------------------------
# loc_args: --zone (and --project) for every gcloud call.
loc_args() {
  LOC=("--zone=$ZONE")
  [[ -n $PROJECT ]] && LOC+=("--project=$PROJECT")
  return 0
}

# ---- create / state / delete -----------------------------------------------------------------
do_create() {
  loc_args
  if ((QUEUED)); then
    local cmd=(gcloud compute tpus queued-resources create "$QR_NAME" "${LOC[@]}"
      "--node-id=$NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$VERSION")
    ((SPOT)) && cmd+=(--spot)
    ((RESERVED)) && cmd+=(--reserved)
    run "${cmd[@]}" || return
    wait_active
  else
    local cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}"
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION")
    ((SPOT)) && cmd+=(--spot)
    ((PREEMPTIBLE)) && cmd+=(--preemptible)
    ((RESERVED)) && cmd+=(--reserved)
    run "${cmd[@]}"
  fi
}

# get_state: sets STATE to the node's state (tpu-vm describe) or the queued resource's
# (queued-resources describe), NOT_FOUND when it does not exist, ERROR when describe failed
# otherwise. Under --dry-run: ASSUME_STATE.
get_state() {
  loc_args
  local cmd err errf rc out
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources describe "$QR_NAME" "${LOC[@]}" '--format=value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" '--format=value(state)')
  fi
  if ((DRY_RUN)); then
    run "${cmd[@]}"
    STATE=${ASSUME_STATE:-READY}
    [[ -n $ASSUME_STATE ]] && note "dry run: assuming state $STATE"
    return 0
  fi
  printf '+ %s\n' "$(format_cmd "${cmd[@]}")" >&2
  errf="${TMPDIR:-/tmp}/pro_jax_describe.$$.err"
  if out=$("${cmd[@]}" 2>"$errf"); then rc=0; else rc=$?; fi
  err=$(<"$errf")
  rm -f "$errf"
  if ((rc == 0)); then
    STATE=${out//[[:space:]]/}
    [[ -n $STATE ]] || STATE=UNKNOWN
  elif [[ $err == *NOT_FOUND* || $err == *"not found"* ]]; then
    STATE=NOT_FOUND
  else
    printf '%s\n' "$err" >&2
    STATE=ERROR
  fi
  note "state: $STATE"
}

# classify_state STATE -> ready | pending | dead | missing | stopped | error
classify_state() {
  if ((QUEUED)); then
    case $1 in
      ACTIVE) echo ready ;;
      SUSPENDED | FAILED) echo dead ;;
      NOT_FOUND) echo missing ;;
      ERROR) echo error ;;
      *) echo pending ;; # CREATING ACCEPTED PROVISIONING WAITING_FOR_RESOURCES SUSPENDING DELETING
    esac
  else
    case $1 in
      READY) echo ready ;;
      PREEMPTED | TERMINATED) echo dead ;;
      NOT_FOUND) echo missing ;;
      STOPPED) echo stopped ;;
      ERROR) echo error ;;
      *) echo pending ;; # CREATING STARTING RESTARTING REPAIRING REIMAGING STOPPING DELETING ...
    esac
  fi
}

# wait_active: poll a queued resource until ACTIVE (fails on FAILED / SUSPENDED / timeout).
wait_active() {
  local waited=0
  if ((DRY_RUN)); then
    local ASSUME_STATE="" # (dynamic scope: get_state sees it) no state to assume here
    get_state
    note "(repeated every ${POLL}s until the state is ACTIVE)"
    return 0
  fi
  while :; do
    get_state
    case $STATE in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) die "queued resource $QR_NAME is $STATE" ;;
    esac
    if ((WAIT_TIMEOUT > 0 && waited >= WAIT_TIMEOUT)); then
      die "queued resource $QR_NAME still $STATE after ${waited}s (--wait-timeout)"
    fi
    ((POLL > 0)) && sleep "$POLL"
    waited=$((waited + POLL))
  done
}

do_delete() {
  loc_args
  local cmd
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources delete "$QR_NAME" "${LOC[@]}" --force)
  else
    cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}")
  fi
  (($1)) && cmd+=(--quiet)
  run "${cmd[@]}"
}

# ---- commands on the workers ----
# The do_* functions stop at the first failing command with `|| return`, so they also stop when
# called where `set -e` is ignored (in an `if` or `&&` list, as resume.sh --watch does).-------------------------------------------------------------
# ssh_workers WORKER COMMAND: run COMMAND (a shell string for the remote bash) on WORKER (0, all...).
ssh_workers() {
  loc_args
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" "--worker=$1" "--command=$2"
}

# Python >= 3.11 from uv's managed builds (TPU images ship 3.10), and a venv for pro-jax.
setup_command() {
  # shellcheck disable=SC2088  # '~' is expanded by the remote shell
  printf '%s' "set -euo pipefail; export PATH=\"\$HOME/.local/bin:\$PATH\"; " \
    "if ! command -v uv >/dev/null; then python3 -m pip install --user --quiet --upgrade uv" \
    " || curl -LsSf https://astral.sh/uv/install.sh | sh; fi; " \
    "uv python install $PYTHON_VERSION; " \
    "uv venv --python $PYTHON_VERSION --seed --allow-existing ~/$VENV_DIR; " \
    "~/$VENV_DIR/bin/python --version"
}

do_setup() {
  ssh_workers all "$(setup_command)"
}

unpack_command() {
  local s="set -euo pipefail; export PATH=\"\$HOME/.local/bin:\$PATH\"; "
  s+="mkdir -p ~/$REMOTE_DIR; tar -xzf ~/$REMOTE_TARBALL -C ~/$REMOTE_DIR"
  if ((!NO_INSTALL)); then
    local target="\$HOME/$REMOTE_DIR"
    [[ -n $EXTRAS ]] && target+="[$EXTRAS]"
    s+="; uv pip install --python ~/$VENV_DIR/bin/python -e \"$target\""
  fi
  printf '%s' "$s"
}

do_ship() {
  loc_args
  if ((!DRY_RUN)) && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    note "warning: uncommitted changes are not shipped (git archive $REF); commit them first"
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$TARBALL" "$REF" || return
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$REMOTE_TARBALL" "${LOC[@]}" --worker=all || return
  ssh_workers all "$(unpack_command)"
}

# The `pro-jax <stage>` command line, each argument quoted for the remote shell.
stage_argv() {
  STAGE_ARGV=("$STAGE")
  [[ -n $CONFIG ]] && STAGE_ARGV+=(--config "$CONFIG")
  STAGE_ARGV+=(--workdir "$WORKDIR" "${PASSTHROUGH[@]}")
}

# The remote shell line that starts COMMAND (already quoted for the remote shell) in the background on
# a worker: refuses while RUN_NAME's pid is alive, appends a "=== launch DATE<LABEL> ===" header and
# COMMAND's output to ~/LOG_DIR/RUN_NAME.log, records the pid. Usage: background_launch_command LABEL COMMAND
background_launch_command() {
  local label=$1 command=$2
  # shellcheck disable=SC2088  # '~' is expanded by the remote shell
  local logs="~/$LOG_DIR" pid log
  pid="$logs/$RUN_NAME.pid"
  log="$logs/$RUN_NAME.log"
  local envs=(PYTHONUNBUFFERED=1 "${ENV_VARS[@]}")
  printf '%s' "set -euo pipefail; mkdir -p $logs; cd ~/$REMOTE_DIR; " \
    "if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then " \
    "echo \"$RUN_NAME is already running on \$(hostname) (pid \$(cat $pid)); not launching\" >&2; exit 3; fi; " \
    "echo \"=== launch \$(date -u +%FT%TZ)$label ===\" >> $log; " \
    "nohup env $(format_cmd "${envs[@]}") $command" \
    " >> $log 2>&1 < /dev/null & echo \$! > $pid; " \
    "echo \"launched $RUN_NAME on \$(hostname): pid \$(cat $pid), log $log\""
}

launch_command() {
  stage_argv
  # shellcheck disable=SC2088  # '~' is expanded by the remote shell
  background_launch_command "" "~/$VENV_DIR/bin/pro-jax $(format_cmd "${STAGE_ARGV[@]}")"
}

do_launch() {
  ssh_workers all "$(launch_command)"
}
