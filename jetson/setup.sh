#!/usr/bin/env bash
# Prepare a Jetson for reproducible benchmarks: report L4T/JetPack, set the power mode, lock the
# clocks (jetson_clocks), and check the Python packages the runtime needs (tensorrt, pycuda, numpy).
#   jetson/setup.sh [--mode N] [--no-clocks] [--restore] [--no-deps]
# --mode N     nvpmodel mode (default 0 = MAXN on TX2/Orin); --restore undoes jetson_clocks.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=0; CLOCKS=1; DEPS=1; RESTORE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) MODE="$2"; shift 2 ;;
    --no-clocks) CLOCKS=0; shift ;;
    --no-deps) DEPS=0; shift ;;
    --restore) RESTORE=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
STORE=/tmp/qvit-edge.jetson_clocks.conf

python3 -m qvit l4t || exit 2

if [ "$RESTORE" -eq 1 ]; then
  [ -f "$STORE" ] || { echo "error: nothing to restore ($STORE missing)" >&2; exit 2; }
  $SUDO jetson_clocks --restore "$STORE" && echo "clocks restored"
  exit 0
fi

if command -v nvpmodel >/dev/null; then
  $SUDO nvpmodel -m "$MODE"
  nvpmodel -q | head -n 1
else
  echo "warning: nvpmodel not found; power mode unchanged"
fi

if [ "$CLOCKS" -eq 1 ]; then
  if command -v jetson_clocks >/dev/null; then
    [ -f "$STORE" ] || $SUDO jetson_clocks --store "$STORE"
    $SUDO jetson_clocks
    echo "clocks locked to maximum (undo: jetson/setup.sh --restore)"
  else
    echo "warning: jetson_clocks not found; clocks not locked (benchmarks will vary)"
  fi
fi

if [ "$DEPS" -eq 1 ]; then
  python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" \
    || { echo "error: TensorRT Python bindings missing: sudo apt-get install python3-libnvinfer (JetPack) or use docker/Dockerfile.jetson" >&2; exit 2; }
  python3 -c "import numpy" || { echo "error: numpy missing: sudo apt-get install python3-numpy" >&2; exit 2; }
  if ! python3 -c "import pycuda" 2>/dev/null && ! python3 -c "import cuda" 2>/dev/null; then
    PYV=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$PYV" = "3.6" ]; then PIN="pycuda==2021.1"; else PIN="pycuda==2024.1.2"; fi
    echo "installing $PIN (needs the CUDA toolkit on PATH: export PATH=/usr/local/cuda/bin:\$PATH)"
    PATH=/usr/local/cuda/bin:$PATH python3 -m pip install --user "$PIN"
  fi
fi
python3 -m jetson.doctor   # what is still wrong, each with its fix
echo "ready: python3 -m jetson.bench_matrix --models deit_t deit_s --bits 8 4 (see runtime/README.md)"
