# shellcheck shell=bash
# shellcheck disable=SC2034  # variables read by the launch_<setting>.sh scripts sourcing this
# Shared code of experiments/launch_<setting>.sh: run a paper setting's PRO stages IN ORDER on every
# worker of a TPU VM (one background chain per worker, like tpu_scripts/launch.sh runs one stage), or in
# the foreground on this machine (--local). Sourced, never run. The sourcing script sets SETTING,
# DEFAULT_LOSS and DEFAULT_STAGES, then calls `launch_setting "$@"`.
#
# Argument parsing, quoting, --dry-run and the ssh command come from tpu_scripts/common.sh.

_exp_dir=${BASH_SOURCE[0]%/*}
[[ $_exp_dir == "${BASH_SOURCE[0]}" ]] && _exp_dir=.
# shellcheck source=SCRIPTDIR/../tpu_scripts/common.sh
source "$_exp_dir/../tpu_scripts/common.sh"

PIPELINE_STAGES=(sft rm adapter policy eval)
LOSSES=(ppo ric modpo wdpo dpo)
STAGES_ARG=""
LOSS=""
LOCAL=0
OPTIONS=()

setting_usage() {
  printf '%s' "usage: $SCRIPT_NAME --name NAME --zone ZONE --workdir DIR [--stages LIST] [--loss LOSS]
                 [--option NAME ...] [--run-name NAME] [--env KEY=VALUE ...] [--local] [--project ID] [--dry-run]
                 [-- CONFIG_OVERRIDES ...]

The PRO pipeline of the paper setting '$SETTING' (experiments/$SETTING.py, docs/experiments.md), stage
after stage in one background chain on every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all):
  python experiments/preflight.py --config experiments/$SETTING.py:policy,LOSS[,OPTION] --stages LIST
  pro-jax STAGE --config experiments/$SETTING.py:STAGE,LOSS[,OPTION] --workdir DIR [overrides]  (each STAGE)
logged to ~/pro_jax_logs/RUN.log (pid in RUN.pid; a second launch while it runs is refused). The chain
stops at the first failing stage; a preempted stage exits 75: launch again with the same --workdir (the
interrupted stage resumes from its last checkpoint; finished ones load their inputs, find their final
checkpoint and return; --stages skips them altogether). See docs/experiments.md.

  --workdir    gs://BUCKET/PATH (shared by all workers) or a local path (single host)
  --stages     comma-separated, in pipeline order (default: $DEFAULT_STAGES)
  --loss       policy loss: ppo, ric, modpo, wdpo or dpo (default: $DEFAULT_LOSS)
  --option     a named variant of the setting's config (repeatable), e.g. no_humor (helpful_assistant)
  --run-name   log / pid file name on the workers (default: $SETTING)
  --env        extra environment variable for the run (repeatable), e.g. PRO_JAX_MODELS=/mnt/models
  --local      run the stages here, in the foreground (e.g. on a single-host TPU VM); needs no --name/--zone
  --           config overrides for every stage, e.g. -- --config.policy.pro.ppo.iterations=200
  --dry-run    print the command(s), one per line with a '+ ' prefix, and run nothing"
}

flags_setting() {
  case $1 in
    --workdir) _set WORKDIR value ;;
    --stages) _set STAGES_ARG value ;;
    --loss) _set LOSS value ;;
    --option) _set OPTIONS array ;;
    --run-name) _set RUN_NAME value ;;
    --env) _set ENV_VARS array ;;
    --local) _set LOCAL bool ;;
    *) flags_remote "$1" ;;
  esac
}

script_flag() { flags_setting "$1"; } # called by parse_args (tpu_scripts/common.sh)

_in_list() {
  local x=$1
  shift
  local y
  for y in "$@"; do [[ $x == "$y" ]] && return 0; done
  return 1
}

# validate_setting: STAGES (array, pipeline order), LOSS, RUN_NAME; usage errors before anything runs.
validate_setting() {
  if ((!LOCAL)); then
    validate_common
  fi
  validate_remote
  require "$WORKDIR" --workdir
  [[ -n $LOSS ]] || LOSS=$DEFAULT_LOSS
  _in_list "$LOSS" "${LOSSES[@]}" || usage_error "--loss '$LOSS': choose one of ${LOSSES[*]}"
  [[ -n $STAGES_ARG ]] || STAGES_ARG=$DEFAULT_STAGES
  IFS=, read -r -a STAGES <<<"$STAGES_ARG"
  ((${#STAGES[@]})) || usage_error "--stages is empty"
  local s i last=-1
  for s in "${STAGES[@]}"; do
    _in_list "$s" "${PIPELINE_STAGES[@]}" || usage_error "--stages: unknown stage '$s' (stages: ${PIPELINE_STAGES[*]})"
    for i in "${!PIPELINE_STAGES[@]}"; do
      [[ ${PIPELINE_STAGES[$i]} == "$s" ]] && break
    done
    ((i > last)) || usage_error "--stages '$STAGES_ARG': give each stage once, in pipeline order (${PIPELINE_STAGES[*]})"
    last=$i
  done
  local o
  for o in "${OPTIONS[@]}"; do
    [[ $o =~ ^[a-z][a-z0-9_]*$ ]] || usage_error "--option '$o': lowercase letters, digits and _ only"
  done
  [[ -z $RUN_NAME ]] && RUN_NAME=$SETTING
  [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--run-name '$RUN_NAME': letters, digits, . _ - only"
  local e
  for e in "${ENV_VARS[@]}"; do
    [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$e' must look like NAME=VALUE"
  done
  if ((!LOCAL)) && [[ $WORKDIR != gs://* ]]; then
    note "warning: --workdir '$WORKDIR' is on each worker's own disk: a multi-host run needs a shared" \
      "gs:// workdir, and a local one is lost when the TPU is preempted or deleted"
  fi
  return 0
}

CONFIG_FILE() { printf 'experiments/%s.py' "$SETTING"; }

# config_spec STAGE: experiments/SETTING.py:STAGE,LOSS[,OPTION...]
config_spec() {
  local spec o
  spec="$(CONFIG_FILE):$1,$LOSS"
  for o in "${OPTIONS[@]}"; do spec+=",$o"; done
  printf '%s' "$spec"
}

# preflight_argv / stage_argv STAGE: the argument vectors (without the program).
preflight_argv() {
  ARGV=(experiments/preflight.py --config "$(config_spec policy)" --stages "$(
    IFS=,
    echo "${STAGES[*]}"
  )" --workdir "$WORKDIR" "${PASSTHROUGH[@]}")
}

setting_stage_argv() {
  ARGV=("$1" --config "$(config_spec "$1")" --workdir "$WORKDIR" "${PASSTHROUGH[@]}")
}

# The chain run by `bash -c` on each worker: preflight && stage && stage ... ($HOME expanded there).
chain_command() {
  local bin="\$HOME/$VENV_DIR/bin" s chain
  preflight_argv
  chain="$bin/python $(format_cmd "${ARGV[@]}")"
  for s in "${STAGES[@]}"; do
    setting_stage_argv "$s"
    chain+=" && $bin/pro-jax $(format_cmd "${ARGV[@]}")"
  done
  printf '%s' "$chain"
}

remote_launch_command() {
  background_launch_command " stages ${STAGES[*]}" "bash -c $(quote "$(chain_command)")"
}

run_local() {
  local s e
  cd "$REPO_ROOT" || die "cannot cd to $REPO_ROOT"
  for e in "${ENV_VARS[@]}"; do
    export "${e?}"
  done
  preflight_argv
  run python "${ARGV[@]}"
  for s in "${STAGES[@]}"; do
    setting_stage_argv "$s"
    run pro-jax "${ARGV[@]}"
  done
}

launch_setting() {
  USAGE=$(setting_usage)
  ACCEPTS_PASSTHROUGH=1
  parse_args "$@"
  validate_setting
  if ((LOCAL)); then
    run_local
  else
    ssh_workers all "$(remote_launch_command)"
  fi
}
