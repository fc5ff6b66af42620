# shellcheck shell=bash
# Shared helpers of the spider_jax launch scripts (tpu_pod.sh,
# slurm_gpu.sbatch, local_multiprocess.sh). Source it, do not run it.
#
# Conventions:
#   * `run CMD ARGS...` prints "+ CMD ARGS..." (shell-quoted, one line) and
#     runs it; in dry-run mode (DRY_RUN=1, or --dry-run in the scripts) it
#     prints the line on stdout and runs nothing.
#   * Usage errors (a missing variable or flag, an unknown argument) exit 2
#     with a message that says how to fix them.

# The JAX release every launcher installs (CPU pins live in requirements.txt).
SPIDER_JAX_JAX_VERSION="${SPIDER_JAX_JAX_VERSION:-0.10.2}"

# Name of the calling script, for messages.
PROG="${PROG:-$(basename "${BASH_SOURCE[1]:-$0}")}"

# Prints an error and exits 2 (usage error).
die_usage() {
  echo "$PROG: error: $*" >&2
  echo "$PROG: run '$PROG --help' for usage." >&2
  exit 2
}

# Prints an error and exits 1 (runtime error).
die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

info() {
  echo "$PROG: $*" >&2
}

# True when DRY_RUN is set to 1/true/yes.
is_dry_run() {
  case "${DRY_RUN:-0}" in
    1 | true | yes | TRUE | YES) return 0 ;;
    *) return 1 ;;
  esac
}

# Quotes one word for a POSIX shell, leaving plain words as they are.
shquote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ && "$s" != '~'* ]]; then
    printf '%s' "$s"
  else
    local q="'\\''"
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Quotes a whole command line (words separated by single spaces).
quote_cmd() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shquote "$a")"
  done
  printf '%s' "$out"
}

# Runs a command, or only prints it in dry-run mode.
run() {
  if is_dry_run; then
    printf '+ %s\n' "$(quote_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

# run_to FILE CMD ARGS...: runs CMD with stdout to FILE (printed as "> FILE").
run_to() {
  local file="$1"
  shift
  if is_dry_run; then
    printf '+ %s > %s\n' "$(quote_cmd "$@")" "$(shquote "$file")"
    return 0
  fi
  printf '+ %s > %s\n' "$(quote_cmd "$@")" "$(shquote "$file")" >&2
  "$@" >"$file"
}

# require_var NAME HOWTO: exits 2 unless the variable NAME is non-empty.
require_var() {
  local name="$1" howto="$2"
  if [[ -z "${!name:-}" ]]; then
    die_usage "$name is not set; $howto"
  fi
}

# need_value OPTION "$@": exits 2 unless OPTION is followed by a value.
need_value() {
  if [[ $# -lt 2 || "$2" == --* ]]; then
    die_usage "option $1 needs a value"
  fi
}

# has_flag NAME ARGS...: true if ARGS contain --NAME or --NAME=...
has_flag() {
  local name="$1" a
  shift
  for a in "$@"; do
    if [[ "$a" == "--$name" || "$a" == "--$name="* ]]; then
      return 0
    fi
  done
  return 1
}

# flag_value NAME ARGS...: prints the value of the last --NAME=V / --NAME V.
flag_value() {
  local name="$1" value="" prev=""
  shift
  local a
  for a in "$@"; do
    if [[ "$prev" == "--$name" ]]; then
      value="$a"
    elif [[ "$a" == "--$name="* ]]; then
      value="${a#*=}"
    fi
    prev="$a"
  done
  printf '%s' "$value"
}

# The pip requirement filter: requirements.txt without the jax/jaxlib pins
# (the accelerator launchers install jax[tpu] / jax[cuda12] instead).
JAX_PIN_REGEX='^[[:space:]]*(jax|jaxlib)[[:space:]]*([=<>!~;[]|$)'

# bootstrap_venv PYTHON VENV REPO JAX_SPEC: creates VENV (if missing) with
# JAX_SPEC, the pinned requirements minus jax/jaxlib, and the repo (editable,
# no deps). Idempotent: pip skips what is installed.
bootstrap_venv() {
  local python="$1" venv="$2" repo="$3" jax_spec="$4"
  if [[ ! -x "$venv/bin/python" ]]; then
    run "$python" -m venv "$venv"
  fi
  run "$venv/bin/python" -m pip install -q --upgrade pip
  run "$venv/bin/python" -m pip install -q "$jax_spec"
  run_to "$venv/requirements-nojax.txt" \
    grep -v -E "$JAX_PIN_REGEX" "$repo/requirements.txt"
  run "$venv/bin/python" -m pip install -q -r "$venv/requirements-nojax.txt"
  run "$venv/bin/python" -m pip install -q --no-deps -e "$repo"
  run "$venv/bin/python" -c \
    "import jax, spider_jax; print('jax', jax.__version__, 'ready')"
}

# find_python: prints the first python >= 3.11 on PATH (jax 0.10.2, numpy
# 2.4 and flax 0.12 need 3.11), or nothing.
find_python() {
  local p
  for p in python3.13 python3.12 python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1 &&
      "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        >/dev/null 2>&1; then
      command -v "$p"
      return 0
    fi
  done
  return 0
}

# free_port PYTHON: prints a free TCP port on 127.0.0.1.
free_port() {
  "$1" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}
