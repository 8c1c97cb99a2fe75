#!/usr/bin/env bash
# Runs a command on a lent GPU machine (which has CuPy, torch and nvcc but no package
# index): installs the carried wheels from .whl/ first (../shared/tools/device-wheels.sh
# puts them there), then runs "$@" with the package importable.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FERRUM_GEN_CACHE=${FERRUM_GEN_CACHE:-/tmp/ferrum-gen-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
"$@"
