#!/usr/bin/env bash
# Bring a run back after preemption: check the TPU's state; when it was preempted (or is gone),
# recreate it, set it up, ship the code and relaunch the stage with the same workdir, so the
# engine resumes from the latest checkpoint there. --watch keeps doing this in a loop.
set -euo pipefail
_here=${BASH_SOURCE[0]%/*}
[[ $_here == "${BASH_SOURCE[0]}" ]] && _here=.
# shellcheck source=common.sh
source "$_here/common.sh"

USAGE="usage: $SCRIPT_NAME --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME
                 --stage STAGE --workdir gs://... [--config FILE] [--spot | --preemptible]
                 [--queued [--qr-name ID]] [--watch] [--poll 60] [--max-polls N]
                 [--max-restarts N] [create/setup/ship/launch options] [--dry-run]
                 [--assume-state STATE] [-- EXTRA_ARGS ...]

State (gcloud compute tpus tpu-vm describe NAME --format='value(state)', or for --queued
gcloud compute tpus queued-resources describe ID --format='value(state.state)'):
  READY / ACTIVE                 one-shot: relaunch the stage (same workdir: it resumes)
                                 --watch: nothing to do, poll again
  PREEMPTED / TERMINATED         delete, create, setup, ship, launch
  (queued) SUSPENDED / FAILED    delete --force, create, wait ACTIVE, setup, ship, launch
  NOT_FOUND                      create, setup, ship, launch (so this also does a first bring-up)
  CREATING, PROVISIONING, ...    wait
  STOPPED                        stop with an error (someone stopped it: start or delete it)

  --watch          loop: check every --poll seconds (default 60) and recover each preemption
  --max-polls      stop after this many state checks (0 = never; default 0)
  --max-restarts   give up after recreating this many times (0 = no limit)
  --assume-state   with --dry-run: the state to plan for (default PREEMPTED)
  --dry-run        print the commands (one per line, '+ ' prefix) and run nothing
All other options are those of create.sh, setup.sh, ship.sh and launch.sh; arguments after --
go to 'pro-jax STAGE'.
"

ACCEPTS_PASSTHROUGH=1
POLL=60
script_flag() {
  case $1 in
    --watch) _set WATCH bool ;;
    --max-polls) _set MAX_POLLS value ;;
    --max-restarts) _set MAX_RESTARTS value ;;
    --assume-state) _set ASSUME_STATE value ;;
    *) flags_create "$1" || flags_setup "$1" || flags_ship "$1" || flags_launch "$1" ;;
  esac
}

parse_args "$@"
validate_common
validate_create
validate_setup
validate_ship
validate_launch
_is_uint "$MAX_POLLS" || usage_error "--max-polls '$MAX_POLLS' must be a number"
_is_uint "$MAX_RESTARTS" || usage_error "--max-restarts '$MAX_RESTARTS' must be a number"
if [[ -n $ASSUME_STATE ]] && ((!DRY_RUN)); then
  usage_error "--assume-state is for --dry-run only"
fi
ASSUME_STATE=${ASSUME_STATE:-PREEMPTED}
[[ $ASSUME_STATE =~ ^[A-Z_]+$ ]] || usage_error "--assume-state '$ASSUME_STATE': a state such as PREEMPTED"

bring_up() {
  do_setup || return
  do_ship || return
  do_launch
}

polls=0
restarts=0
needs_bring_up=0
while :; do
  polls=$((polls + 1))
  get_state
  kind=$(classify_state "$STATE")
  case $kind in
    ready)
      if ((needs_bring_up)); then
        note "TPU is $STATE again: finishing the interrupted setup / ship / launch"
        if ((WATCH)); then
          if (bring_up); then needs_bring_up=0; else note "warning: bring-up failed; retrying at the next poll"; fi
        else
          bring_up
          exit 0
        fi
      elif ((!WATCH)); then
        note "TPU is $STATE: relaunching $STAGE with workdir $WORKDIR (it resumes from the latest checkpoint)"
        do_launch
        exit 0
      fi
      ;;
    dead | missing)
      if ((MAX_RESTARTS > 0 && restarts >= MAX_RESTARTS)); then
        die "TPU is $STATE and --max-restarts $MAX_RESTARTS is used up"
      fi
      restarts=$((restarts + 1))
      note "TPU is $STATE: recreating it (restart $restarts)"
      if [[ $kind == dead ]]; then
        do_delete 1
      fi
      if ((WATCH)); then
        needs_bring_up=1
        if (do_create) && (bring_up); then
          needs_bring_up=0
        else
          note "warning: recreate failed; retrying at the next poll"
        fi
      else
        do_create
        bring_up
        exit 0
      fi
      ;;
    stopped)
      die "TPU $NAME is STOPPED (by a user?): start it (gcloud compute tpus tpu-vm start) or delete it"
      ;;
    error)
      ((WATCH)) || die "could not read the state of $NAME"
      note "warning: could not read the state; retrying at the next poll"
      ;;
    pending)
      note "TPU is $STATE: waiting"
      ;;
  esac
  if ((DRY_RUN)); then
    exit 0
  fi
  if ((MAX_POLLS > 0 && polls >= MAX_POLLS)); then
    note "stopping after $polls state checks (--max-polls)"
    exit 0
  fi
  ((POLL > 0)) && sleep "$POLL"
done
