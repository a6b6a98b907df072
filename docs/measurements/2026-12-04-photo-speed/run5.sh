#!/usr/bin/env bash
# Fifth device call (second session): the code as committed, with --data.cpu_decode_share auto
# (data/balance.py). The benchmark with its defaults run and the data path alone, ViT-B-32, on the
# photo-like, 500x375 and 1024x768 sets; tuned runs for the gpu and cpu decode paths.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
timeout 560 python3 -m clip_fabric benchmark --work_dir /tmp/bench --models ViT-B-32 \
    --image_sizes photo,500x375,1024x768 --num_images 24000,24000,16000 --defaults true --naive false \
    --decode [gpu,cpu] --output $OUT/benchmark_b32.json --chart $OUT/benchmark_b32.png 2>&1 | tee $OUT/run5_b32.log | grep -v "^\s*$" | tail -80
