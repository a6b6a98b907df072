#!/usr/bin/env bash
# First device call: stage timings, then predict with default options on photo-like tar shards,
# the new data path against the code before it (.old/, HEAD 8ffec72), ViT-B-32 and ViT-L-14.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
timeout 200 python3 docs/measurements/2026-12-04-photo-speed/stages.py $OUT/stages.json --images 2048 2>&1 | grep -v "^WARNING" | tail -5
python3 - <<'PY'
from pathlib import Path
from clip_fabric.benchmark.shards import make_dataset, PHOTO
print(make_dataset(Path("/tmp/bench"), PHOTO, 24000, 1000, 16))
PY
SRC='/tmp/bench/shards/photo-s1000-q90-v1/{000000..000023}.tar'
run() { label=$1; shift; start=$(date +%s%N); timeout 200 "$@" --data.format webdataset --data.source "$SRC" --output.dir /tmp/o-$label > $OUT/$label.log 2>&1; rc=$?; end=$(date +%s%N); echo "$label rc=$rc wall_ms=$(( (end - start) / 1000000 ))"; tail -2 $OUT/$label.log; python3 -c "import json;t=json.load(open('/tmp/o-$label/summary.json'))['this_run'];print({k:t.get(k) for k in ('rows','samples_per_s','steady_samples_per_s','decode','jpeg_library','batch_size','startup_s')})"; }
run b32-new python3 -m clip_fabric predict --model.name ViT-B-32
run b32-old .old/run.sh predict --model.name ViT-B-32
run b32-new-cpu python3 -m clip_fabric predict --model.name ViT-B-32 --data.decode cpu
run l14-new python3 -m clip_fabric predict --model.name ViT-L-14
run l14-old .old/run.sh predict --model.name ViT-L-14
