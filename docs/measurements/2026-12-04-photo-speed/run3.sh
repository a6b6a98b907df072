#!/usr/bin/env bash
# Third device call: predict with default options on photo-like tar shards (this tree against HEAD
# 8ffec72 in .old/), the GPU tests, then the stage timings of this tree.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY'
from pathlib import Path
from clip_fabric.benchmark.shards import make_dataset, PHOTO
print(make_dataset(Path("/tmp/bench"), PHOTO, 24000, 1000, 16))
PY
SRC='/tmp/bench/shards/photo-s1000-q90-v2/{000000..000023}.tar'
run() { label=$1; shift; start=$(date +%s%N); timeout 150 "$@" --data.format webdataset --data.source "$SRC" --output.dir /tmp/o-$label > $OUT/$label.log 2>&1; rc=$?; end=$(date +%s%N); echo "$label rc=$rc wall_ms=$(( (end - start) / 1000000 ))"; python3 -c "import json;t=json.load(open('/tmp/o-$label/summary.json'))['this_run'];print({k:t.get(k) for k in ('rows','samples_per_s','steady_samples_per_s','decode','jpeg_library','batch_size','num_workers','precision')})"; }
run b32-new python3 -m clip_fabric predict --model.name ViT-B-32
run b32-old .old/run.sh predict --model.name ViT-B-32
run l14-new python3 -m clip_fabric predict --model.name ViT-L-14
PYTHONPATH=/tmp/site:$PWD timeout 270 python3 -m pytest -q -m gpu tests/test_gpu.py -x 2>&1 | tail -4
PYTHONPATH=/tmp/site:$PWD timeout 150 python3 docs/measurements/2026-12-04-photo-speed/stages.py $OUT/stages.json --images 2048 2>&1 | grep -E "^(photo|500|1024)|Error|error"
