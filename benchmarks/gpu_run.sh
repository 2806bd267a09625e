#!/bin/bash
# The GPU benchmark in one call of the device tool (README, "Speed": GPU benchmark).
#
# Here, once (fetches the one package the GPU image lacks, ml_collections, as a wheel into
# the git-ignored .whl/):   bash benchmarks/gpu_run.sh --prepare
# Then one device call:     run(command="bash benchmarks/gpu_run.sh", carry=[".whl"],
#                               timeout_s=590)
# On the GPU machine it installs the wheels into /tmp/site, puts this checkout on the path
# (no install of the project, no TensorFlow needed) and runs benchmarks/gpu_step.py, writing
# gpu_step.json, gpu_step.md, gpu_step.log and nvidia_smi.txt to $OUT (default
# /tmp/gpu_step). Extra arguments go to gpu_step.py (e.g. --batches=128 --budget_s=300).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
if [ "$1" = "--prepare" ]; then
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  exec python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_step}
mkdir -p "$OUT"
(nvidia-smi; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv) > "$OUT/nvidia_smi.txt" 2>&1
python3 benchmarks/gpu_step.py --out="$OUT" "$@" 2>&1 | tee "$OUT/gpu_step.log"
