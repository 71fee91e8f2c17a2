#!/usr/bin/env bash
# One prepared GPU check (< 5 min on one NVIDIA GPU, no network needed): installs embedkit from this checkout
# into a private prefix (its dependencies come from the current Python environment), then runs
# scripts/gpu_check.py, which writes everything into one JSON file (default bench/gpu_check.json).
#
#   scripts/gpu_check.sh                 # the check, on the GPU
#   scripts/gpu_check.sh --cpu-smoke     # the same steps at tiny sizes on the CPU (the test suite's dry run)
#
# PYTHON selects the interpreter (default: python3). Missing dependencies on a machine without network:
# install them first from a wheel folder, e.g. pip install --no-index --find-links WHEELS -e '.[test]'.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/embedkit-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "import torch, timm, h5py, faiss, click, tqdm, PIL, tifffile, safetensors, sklearn" 2>/dev/null || {
    echo "gpu_check: the Python environment lacks embedkit's dependencies; install them (pip install -e '$HERE')" >&2
    exit 2
}
"$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --prefix "$WORK/prefix" "$HERE" >"$WORK/pip.log" 2>&1 || {
    cat "$WORK/pip.log" >&2
    echo "gpu_check: installing embedkit failed" >&2
    exit 2
}
SITE="$("$PY" -c "import sysconfig; print(sysconfig.get_path('purelib', vars={'base': '$WORK/prefix', 'platbase': '$WORK/prefix'}))")"
export PYTHONPATH="$SITE" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$WORK"  # so that the installed copy, not the checkout, is imported
"$PY" "$HERE/scripts/gpu_check.py" --work "$WORK" "$@"
