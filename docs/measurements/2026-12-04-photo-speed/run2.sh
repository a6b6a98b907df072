#!/usr/bin/env bash
# Second device call: which nvImageCodec backends work, then the stage timings (both JPEG libraries).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ls /tmp/site/nvidia/ /tmp/site/nvidia/cu13/lib
# diag.py ran in the call before
timeout 300 python3 docs/measurements/2026-12-04-photo-speed/stages.py $OUT/stages.json --images 2048 2>&1 | grep -v "^WARNING" | grep -E "^(photo|500|1024)|Error|error" 
