#!/usr/bin/env bash
# Runs N JAX processes on this machine (CPU), wired together with
# jax.distributed: the multi-host code path of a TPU pod, on a laptop or CI.
# See `launch/local_multiprocess.sh --help`.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="launch/local_multiprocess.sh"
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
PORT="${PORT:-}"
WORKDIR="${WORKDIR:-}"
TIMEOUT="${TIMEOUT:-0}"
PYTHON="${PYTHON:-}"

usage() {
  cat <<USAGE
Usage: $PROG [OPTIONS] train|rank [FLAGS...]
       $PROG [OPTIONS] -- COMMAND [ARGS...]

Starts N processes on localhost with JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D (D CPU devices each), so
jax.device_count() == N * D and jax.process_count() == N. Appended to each
process's command line:
  --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I
(train/rank: python -m spider_jax.train|rank --distributed FLAGS... plus
--workdir=WORKDIR unless FLAGS have one, run from the repo root; with '--',
COMMAND must accept these three flags and pass them to
jax.distributed.initialize). Waits for all; if one fails, stops the others
and exits with its status. Output of process I: WORKDIR/logs/process_I.log.

Options (each also an environment variable):
  --num_processes N        NUM_PROCESSES        (default 2)
  --devices_per_process D  DEVICES_PER_PROCESS  (default 1)
  --port P                 PORT    coordinator port (default: a free one)
  --workdir DIR            WORKDIR run directory: logs go to DIR/logs (required;
                           train/rank without --workdir in FLAGS get DIR)
  --timeout S              TIMEOUT stop all processes after S seconds, fail
                           (default 0 = none)
  --python PY              PYTHON  interpreter for train/rank (default:
                           \$VIRTUAL_ENV's, else .venv/bin/python, else python3)
  --dry-run                DRY_RUN=1  print the commands ("+ ..."), run nothing
  -h, --help               this text

Examples:
  $PROG --num_processes 2 --devices_per_process 2 --workdir runs/mp \\
      train --config=configs/train.py:tiny
  $PROG --num_processes 4 --workdir /tmp/mp -- python my_check.py
USAGE
}

mode=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --num_processes=* | --num-processes=*) NUM_PROCESSES="${1#*=}" ;;
    --devices_per_process=* | --devices-per-process=*) DEVICES_PER_PROCESS="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --timeout=*) TIMEOUT="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --num_processes | --num-processes | --devices_per_process | \
      --devices-per-process | --port | --workdir | --timeout | --python)
      need_value "$@"
      case "$1" in
        --num_processes | --num-processes) NUM_PROCESSES="$2" ;;
        --devices_per_process | --devices-per-process) DEVICES_PER_PROCESS="$2" ;;
        --port) PORT="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --timeout) TIMEOUT="$2" ;;
        --python) PYTHON="$2" ;;
      esac
      shift
      ;;
    --) mode="command"; shift; break ;;
    train | rank) mode="$1"; shift; break ;;
    *) die_usage "unknown argument $1 (expected options, then train, rank or -- COMMAND)" ;;
  esac
  shift
done
export DRY_RUN="${DRY_RUN:-0}"

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
if ! is_int "$NUM_PROCESSES" || ((NUM_PROCESSES < 1)); then
  die_usage "--num_processes must be a positive integer (got '$NUM_PROCESSES')"
fi
if ! is_int "$DEVICES_PER_PROCESS" || ((DEVICES_PER_PROCESS < 1)); then
  die_usage "--devices_per_process must be a positive integer (got '$DEVICES_PER_PROCESS')"
fi
is_int "$TIMEOUT" || die_usage "--timeout must be a number of seconds (got '$TIMEOUT')"
if [[ -n "$PORT" ]] && { ! is_int "$PORT" || ((PORT < 1 || PORT > 65535)); }; then
  die_usage "--port must be a TCP port (got '$PORT')"
fi
[[ -n "$mode" ]] || die_usage "missing train, rank or -- COMMAND"

if [[ -z "$PYTHON" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PYTHON="$REPO/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi

cmd=()
run_dir="$PWD"
if [[ "$mode" == command ]]; then
  [[ $# -ge 1 ]] || die_usage "no COMMAND after --"
  cmd=("$@")
else
  cmd=("$PYTHON" -m "spider_jax.$mode" --distributed "$@")
  if has_flag workdir "$@"; then
    [[ -n "$WORKDIR" ]] || WORKDIR="$(flag_value workdir "$@")"
  elif [[ -n "$WORKDIR" ]]; then
    cmd+=("--workdir=$WORKDIR")
  fi
  run_dir="$REPO"
fi
require_var WORKDIR "pass --workdir DIR or export WORKDIR=DIR (logs go to DIR/logs)"
# Relative WORKDIRs are relative to where this script was started.
if [[ "$WORKDIR" != /* ]]; then
  WORKDIR="$PWD/$WORKDIR"
fi
if [[ "$mode" != command && "$run_dir" != "$PWD" ]]; then
  # Make a relative --workdir in FLAGS mean the same from the repo root.
  for i in "${!cmd[@]}"; do
    if [[ "${cmd[$i]}" == --workdir=* && "${cmd[$i]#--workdir=}" != /* ]]; then
      cmd[i]="--workdir=$PWD/${cmd[$i]#--workdir=}"
    elif ((i > 0)) && [[ "${cmd[$((i - 1))]}" == --workdir &&
      "${cmd[$i]}" != /* ]]; then
      cmd[i]="$PWD/${cmd[$i]}"
    fi
  done
fi

if [[ -z "$PORT" ]]; then
  # python3 is enough to find a port; PYTHON may be a wrapper.
  PORT="$(free_port "$(command -v python3 || echo "$PYTHON")")"
fi
LOG_DIR="$WORKDIR/logs"
coordinator="127.0.0.1:$PORT"
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

proc_cmd() {  # proc_cmd I: the full command of process I.
  PROC_CMD=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "${cmd[@]}"
    "--coordinator_address=$coordinator" "--num_processes=$NUM_PROCESSES"
    "--process_id=$1")
}

if is_dry_run; then
  run mkdir -p "$LOG_DIR"
  if [[ "$run_dir" != "$PWD" ]]; then
    run cd "$run_dir"
  fi
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    proc_cmd "$i"
    printf '+ %s > %s 2>&1 &\n' "$(quote_cmd "${PROC_CMD[@]}")" \
      "$(shquote "$LOG_DIR/process_$i.log")"
  done
  printf '+ wait\n'
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
cleanup() {  # Stops the processes still running (TERM, then KILL).
  local pid alive=()
  for pid in "${pids[@]}"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      alive+=("$pid")
    fi
  done
  [[ ${#alive[@]} -gt 0 ]] || return 0
  local t
  for ((t = 0; t < 50; t++)); do
    local any=0
    for pid in "${alive[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then any=1; fi
    done
    [[ $any == 1 ]] || break
    sleep 0.1
  done
  for pid in "${alive[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

info "$NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator $coordinator, logs in $LOG_DIR"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  proc_cmd "$i"
  printf '+ %s > %s 2>&1 &\n' "$(quote_cmd "${PROC_CMD[@]}")" \
    "$(shquote "$LOG_DIR/process_$i.log")" >&2
  (cd "$run_dir" && exec "${PROC_CMD[@]}") >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done

# Poll until all have finished or one has failed.
remaining="$NUM_PROCESSES"
failed=""
status=0
start="$SECONDS"
while ((remaining > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    pid="${pids[$i]}"
    [[ -n "$pid" ]] || continue
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      pids[i]=""
      remaining=$((remaining - 1))
      if ((rc != 0)) && [[ -z "$failed" ]]; then
        failed="$i"
        status="$rc"
      fi
    fi
  done
  if [[ -n "$failed" ]]; then
    info "process $failed failed with exit code $status; stopping the others"
    cleanup
    break
  fi
  if ((TIMEOUT > 0 && SECONDS - start >= TIMEOUT)); then
    info "timeout after ${TIMEOUT}s; stopping all processes"
    cleanup
    failed=timeout
    status=124
    break
  fi
  ((remaining == 0)) || sleep 0.2
done

if [[ -n "$failed" ]]; then
  if [[ "$failed" != timeout ]]; then
    info "last lines of $LOG_DIR/process_$failed.log:"
    tail -n 20 "$LOG_DIR/process_$failed.log" >&2 || true
  fi
  exit "$status"
fi
info "all $NUM_PROCESSES processes finished; logs in $LOG_DIR"
