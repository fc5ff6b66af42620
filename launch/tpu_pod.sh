#!/usr/bin/env bash
# Runs spider_jax on a Cloud TPU VM pod slice (big_vision run_tpu.sh pattern):
# the same program on every worker, jax.distributed.initialize() via
# --distributed, a shared gs:// workdir. See `launch/tpu_pod.sh --help` and
# the "Running on a TPU pod" section of README.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="launch/tpu_pod.sh"
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
WORKDIR="${WORKDIR:-}"
SPOT="${SPOT:-0}"
YES="${YES:-0}"
DETACH="${DETACH:-0}"
# On the workers, relative to the login user's home directory.
REMOTE_DIR="${REMOTE_DIR:-spider_jax}"
REMOTE_VENV="${REMOTE_VENV:-spider_jax_venv}"
REMOTE_LOG="${REMOTE_LOG:-spider_jax_run.log}"
# What `copy` sends (relative to the repo root).
COPY_PATHS="${COPY_PATHS:-spider_jax configs launch pyproject.toml requirements.txt README.md}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==$SPIDER_JAX_JAX_VERSION}"

usage() {
  cat <<USAGE
Usage: $PROG [OPTIONS] COMMAND [ARGS...]

Creates a Cloud TPU VM slice, installs spider_jax on every worker and runs
the same command on all of them with --distributed (each worker calls
jax.distributed.initialize(), which needs no arguments on Cloud TPU).

Commands (run on your workstation, need gcloud):
  create            gcloud compute tpus tpu-vm create (needs TPU_NAME, ZONE,
                    ACCELERATOR_TYPE)
  copy              copy the code to ~/$REMOTE_DIR on all workers (COPY_PATHS:
                    $COPY_PATHS)
  setup             create the venv ~/$REMOTE_VENV on all workers:
                    pip install "$JAX_SPEC", requirements.txt without the CPU
                    jax/jaxlib pins, pip install --no-deps -e .
  up                create + copy + setup
  train [FLAGS...]  python -m spider_jax.train --distributed FLAGS... on all
                    workers (needs WORKDIR or --workdir=... in FLAGS)
  rank [FLAGS...]   python -m spider_jax.rank --distributed FLAGS... likewise
  exec COMMAND      run a shell command on all workers (e.g. 'tail -n 20
                    $REMOTE_LOG' after a --detach run)
  delete            gcloud compute tpus tpu-vm delete (asks, unless --yes)

Commands a worker runs (called by setup/train/rank through ssh):
  worker-setup, worker-run MODULE [FLAGS...]

Options (each also an environment variable):
  --name NAME             TPU_NAME          slice name
  --zone ZONE             ZONE              e.g. us-central2-b
  --accelerator-type T    ACCELERATOR_TYPE  e.g. v4-32, v5litepod-16, v6e-16
  --version V             TPU_VERSION       software version (default
                          tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite,
                          v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --project P             PROJECT           gcloud project (default: gcloud's)
  --workdir DIR           WORKDIR           run directory, appended as
                          --workdir=DIR to train/rank unless FLAGS have one
  --spot                  SPOT=1            create a Spot slice
  --detach                DETACH=1          train/rank keep running after ssh
                          ends; output in ~/$REMOTE_LOG on each worker
  --yes                   YES=1             delete without asking
  --dry-run               DRY_RUN=1         print every command ("+ ..."),
                                            run nothing
  -h, --help                                this text
Also: REMOTE_DIR (~/$REMOTE_DIR), REMOTE_VENV (~/$REMOTE_VENV), COPY_PATHS,
JAX_SPEC ($JAX_SPEC).

WORKDIR must be storage that every worker sees, normally a gs:// bucket path
(gs://BUCKET/spider_jax/run1): every process opens the same checkpoints,
and process 0 writes the results there. A local path would give each worker
its own, diverging copy. (The entry points must open gs:// paths, e.g. via
etils.epath; otherwise use a bucket mounted with gcsfuse at the same path on
all workers.)

Example:
  export TPU_NAME=spider ZONE=us-central2-b ACCELERATOR_TYPE=v4-16
  $PROG up
  $PROG train --config=configs/train.py:paper --workdir=gs://BUCKET/spider/paper
  $PROG rank --config=configs/rank.py:paper --workdir=gs://BUCKET/spider/paper
  $PROG delete
USAGE
}

# Common gcloud arguments after the subcommand.
gcloud_scope() {
  GCLOUD_SCOPE=(--zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_SCOPE+=(--project "$PROJECT")
  fi
}

require_slice() {
  require_var TPU_NAME "export TPU_NAME=my-slice or pass --name my-slice"
  require_var ZONE "export ZONE=us-central2-b (the slice's zone) or pass --zone ZONE"
  gcloud_scope
}

cmd_create() {
  require_slice
  require_var ACCELERATOR_TYPE \
    "export ACCELERATOR_TYPE=v4-16 (or v5litepod-16, v6e-16, ...) or pass --accelerator-type TYPE"
  local args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_SCOPE[@]}"
    --accelerator-type "$ACCELERATOR_TYPE" --version "$TPU_VERSION")
  if [[ "$SPOT" == 1 ]]; then
    args+=(--spot)
  fi
  run "${args[@]}"
}

# ssh_all REMOTE_COMMAND: runs one shell command line on every worker.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_SCOPE[@]}" \
    --worker=all --command "$1"
}

cmd_copy() {
  require_slice
  local sources=() paths=() p
  read -r -a paths <<<"$COPY_PATHS"
  for p in "${paths[@]}"; do
    [[ -e "$REPO/$p" ]] || die_usage "COPY_PATHS names $p, which is not in $REPO"
    sources+=("$REPO/$p")
  done
  ssh_all "mkdir -p $(shquote "$REMOTE_DIR")"
  # Several sources into an existing directory: each lands at
  # ~/REMOTE_DIR/<basename>, also when copied again.
  run gcloud compute tpus tpu-vm scp --recurse "${sources[@]}" \
    "$TPU_NAME:$REMOTE_DIR" "${GCLOUD_SCOPE[@]}" --worker=all
}

# The command line that runs this script on a worker.
worker_cmd() {
  local envs=()
  if [[ "$REMOTE_VENV" != spider_jax_venv ]]; then
    envs+=("SPIDER_JAX_VENV=$REMOTE_VENV")
  fi
  if [[ "$JAX_SPEC" != "jax[tpu]==$SPIDER_JAX_JAX_VERSION" ]]; then
    envs+=("JAX_SPEC=$JAX_SPEC")
  fi
  if [[ ${#envs[@]} -gt 0 ]]; then
    envs=(env "${envs[@]}")
  fi
  quote_cmd "${envs[@]}" bash "$REMOTE_DIR/launch/tpu_pod.sh" "$@"
}

cmd_setup() {
  require_slice
  ssh_all "$(worker_cmd worker-setup)"
}

# cmd_job MODULE FLAGS...: runs the entry point on all workers.
cmd_job() {
  local module="$1"
  shift
  require_slice
  local flags=(--distributed "$@")
  if ! has_flag workdir "$@"; then
    require_var WORKDIR \
      "export WORKDIR=gs://BUCKET/path, pass --workdir gs://BUCKET/path, or add --workdir=gs://... to the flags (shared storage: every worker must see it)"
    flags+=("--workdir=$WORKDIR")
  fi
  local workdir
  workdir="$(flag_value workdir "${flags[@]}")"
  if [[ "$workdir" != gs://* ]]; then
    info "warning: workdir $workdir is not a gs:// path; all workers must see the same directory."
  fi
  local opts=()
  if [[ "$DETACH" == 1 ]]; then
    opts=(--log "$REMOTE_LOG")
  fi
  ssh_all "$(worker_cmd worker-run "${opts[@]}" "$module" "${flags[@]}")"
}

cmd_exec() {
  [[ $# -ge 1 ]] || die_usage "exec needs a command, e.g. $PROG exec 'uptime'"
  require_slice
  ssh_all "$*"
}

cmd_delete() {
  require_slice
  local args=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}")
  if [[ "$YES" == 1 ]]; then
    args+=(--quiet)
  fi
  run "${args[@]}"
}

#### Worker side (runs on each TPU VM) ####

worker_venv() {
  local venv="${SPIDER_JAX_VENV:-spider_jax_venv}"
  if [[ "$venv" != /* ]]; then
    venv="$HOME/$venv"
  fi
  printf '%s' "$venv"
}

cmd_worker_setup() {
  local python="${PYTHON:-}" venv
  venv="$(worker_venv)"
  if [[ -z "$python" ]]; then
    python="$(find_python)"
  fi
  if [[ -z "$python" ]]; then
    # tpu-ubuntu2204-base ships Python 3.10; jax 0.10.2 needs >= 3.11.
    run sudo apt-get update -qq
    run sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      python3.11 python3.11-venv
    python=python3.11
  fi
  bootstrap_venv "$python" "$venv" "$REPO" "$JAX_SPEC"
}

cmd_worker_run() {
  local log=""
  if [[ "${1:-}" == --log ]]; then
    need_value "$@"
    log="$2"
    shift 2
  fi
  [[ $# -ge 1 ]] || die_usage "worker-run needs a module, e.g. spider_jax.train"
  local venv
  venv="$(worker_venv)"
  if ! is_dry_run && [[ ! -x "$venv/bin/python" ]]; then
    die "no venv at $venv on $(hostname); run '$PROG setup' first"
  fi
  cd "$REPO"
  if [[ -z "$log" ]]; then
    run "$venv/bin/python" -m "$@"
    return
  fi
  [[ "$log" == /* ]] || log="$HOME/$log"
  if is_dry_run; then
    printf '+ nohup %s > %s 2>&1 &\n' "$(quote_cmd "$venv/bin/python" -m "$@")" \
      "$(shquote "$log")"
    return
  fi
  nohup "$venv/bin/python" -m "$@" >"$log" 2>&1 &
  echo "$(hostname): started pid $!, log $log"
}

#### Main ####

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --yes) YES=1 ;;
    --detach) DETACH=1 ;;
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) TPU_VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --name | --zone | --accelerator-type | --version | --project | --workdir)
      need_value "$@"
      case "$1" in
        --name) TPU_NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --accelerator-type) ACCELERATOR_TYPE="$2" ;;
        --version) TPU_VERSION="$2" ;;
        --project) PROJECT="$2" ;;
        --workdir) WORKDIR="$2" ;;
      esac
      shift
      ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
  shift
done
export DRY_RUN="${DRY_RUN:-0}"

[[ $# -ge 1 ]] || die_usage "missing COMMAND (create, copy, setup, up, train, rank, exec, delete)"
command="$1"
shift
case "$command" in
  create | copy | setup | up | delete | worker-setup)
    [[ $# -eq 0 ]] || die_usage "$command takes no arguments (got: $*); options go before the command"
    ;;
esac
case "$command" in
  create) cmd_create ;;
  copy) cmd_copy ;;
  setup) cmd_setup ;;
  up) cmd_create; cmd_copy; cmd_setup ;;
  train) cmd_job spider_jax.train "$@" ;;
  rank) cmd_job spider_jax.rank "$@" ;;
  exec) cmd_exec "$@" ;;
  delete) cmd_delete ;;
  worker-setup) cmd_worker_setup ;;
  worker-run) cmd_worker_run "$@" ;;
  *) die_usage "unknown COMMAND $command (create, copy, setup, up, train, rank, exec, delete)" ;;
esac
