#!/usr/bin/env bash
# The GPU check on a GPU machine, run from the repository root with the bundle that
# `python benchmarks/gpu_bundle.py` wrote in .gpucheck/ (copy or carry that folder along; $MASKFACE_GPU_BUNDLE
# names another folder; relative paths are taken from where the script is started):
#
#   bash benchmarks/gpu_check.sh [OUT [gpu_check.py options]]     OUT: default $OUT, else results/gpu_check
#
# It installs the bundle's wheels into a temporary folder (no index, no dependencies: the machine's own torch,
# numpy, pandas, ... stay as they are), points LFW and dlib's model files at the bundle's copies, and runs
# benchmarks/gpu_check.py. Its output: gpu_check.json and gpu_check.md in OUT.
set -euo pipefail
out=${1:-${OUT:-results/gpu_check}}
bundle=${MASKFACE_GPU_BUNDLE:-.gpucheck}
# paths given relative to where the script was started, before it moves to the repository root
mkdir -p "$out" && out=$(cd "$out" && pwd)
[ -d "$bundle" ] && bundle=$(cd "$bundle" && pwd)
cd "$(dirname "$0")/.."
if [ ! -d "$bundle/wheels" ]; then
    echo "gpu_check.sh: no $bundle/ here: run 'python benchmarks/gpu_bundle.py' first and take it along" >&2
    exit 2
fi
py=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$bundle"/wheels/*.whl
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MASKFACE_DLIB_MODELS="$bundle/models" MASKFACE_LFW="$bundle/lfw"
# the check writes its files after every step and skips what is left after --deadline (540 s); the timeout is
# the last resort inside a 600 s command. Its whole output is kept in gpu_check.log beside its files.
timeout --kill-after=10 585 "$py" benchmarks/gpu_check.py --out "$out" --lfw "$MASKFACE_LFW" "${@:2}" 2>&1 |
    tee "$out/gpu_check.log"
