#!/usr/bin/env bash
# Build KenLM's model builder (`lmplz`, `build_binary`) from the kenlm source package on PyPI.
#
#   bash scripts/build_kenlm.sh                      # -> third_party/kenlm/bin/{lmplz,build_binary}
#   bash scripts/build_kenlm.sh --install-deps       # also apt-get the build dependencies (needs root)
#   bash scripts/build_kenlm.sh --prefix /opt/kenlm  # -> /opt/kenlm/bin
#
# The `kenlm` pip wheel only has the query library; the builder lives in the same source package
# (`lm/builder`), which `pip download --no-binary :all:` fetches from PyPI. Needs g++, cmake and Debian's Boost
# (program-options, system, thread, test) plus zlib/bz2/lzma headers. Point hf_bpd at the result with
# `--kenlm-bin third_party/kenlm/bin`, `KENLM_BIN=third_party/kenlm/bin`, or by putting it on PATH.
set -euo pipefail

KENLM_VERSION="${KENLM_VERSION:-0.3.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/third_party/kenlm"
SRC_DIR="$ROOT/third_party/kenlm-src"
JOBS="${JOBS:-2}"
INSTALL_DEPS=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --src-dir) SRC_DIR="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --install-deps) INSTALL_DEPS=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ "$INSTALL_DEPS" == 1 ]]; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y \
    g++ cmake libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev \
    zlib1g-dev libbz2-dev liblzma-dev
fi

for tool in g++ cmake make; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (rerun with --install-deps, or install it)" >&2; exit 1; }
done
if [[ ! -e /usr/include/boost/program_options.hpp ]]; then
  echo "error: Boost headers not found; run with --install-deps or" >&2
  echo "  apt-get install -y libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev" >&2
  exit 1
fi

mkdir -p "$SRC_DIR"
TARBALL="$SRC_DIR/kenlm-$KENLM_VERSION.tar.gz"
if [[ ! -f "$TARBALL" ]]; then
  # --no-build-isolation: only fetch the sdist, do not build its build requirements (cmake) from source.
  python -m pip download --no-binary :all: --no-deps --no-build-isolation -d "$SRC_DIR" "kenlm==$KENLM_VERSION"
fi
tar -xzf "$TARBALL" -C "$SRC_DIR"
SOURCE="$SRC_DIR/kenlm-$KENLM_VERSION"
[[ -d "$SOURCE/lm/builder" ]] || { echo "error: $SOURCE has no lm/builder (not a full KenLM source)" >&2; exit 1; }

mkdir -p "$SOURCE/build"
cd "$SOURCE/build"
cmake .. -DCMAKE_BUILD_TYPE=Release
make -j"$JOBS" lmplz build_binary

mkdir -p "$PREFIX/bin"
cp bin/lmplz bin/build_binary "$PREFIX/bin/"
echo "installed: $PREFIX/bin/lmplz $PREFIX/bin/build_binary"
