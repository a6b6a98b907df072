#!/usr/bin/env bash
# Fourth device call: the stage timings of the windowed batched resize with the decode thread, predict
# with no options on photo-like, 500x375 and 1024x768 tar shards (this tree against HEAD 8ffec72 in
# .old/), ViT-B-32 and ViT-L-14, then the GPU tests.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHONPATH=/tmp/site:$PWD timeout 150 python3 docs/measurements/2026-12-04-photo-speed/stages.py $OUT/stages.json --images 2048 2>&1 | grep -E "^(photo|500|1024)|Error|error"
python3 - <<'PY'
from pathlib import Path
from clip_fabric.benchmark.shards import make_dataset, PHOTO
for size, n in ((PHOTO, 24000), ((500, 375), 32000), ((1024, 768), 16000)):
    print(make_dataset(Path("/tmp/bench"), size, n, 1000, 16))
PY
run() { label=$1; src=$2; shift 2; start=$(date +%s%N); timeout 120 "$@" --data.format webdataset --data.source "$src" --output.dir /tmp/o-$label > $OUT/$label.log 2>&1; rc=$?; end=$(date +%s%N); echo "$label rc=$rc wall_ms=$(( (end - start) / 1000000 ))"; python3 -c "import json;t=json.load(open('/tmp/o-$label/summary.json'))['this_run'];print({k:t.get(k) for k in ('rows','samples_per_s','steady_samples_per_s','decode','jpeg_library','batch_size','num_workers','precision')})"; }
P='/tmp/bench/shards/photo-s1000-q90-v2/{000000..000023}.tar'
U='/tmp/bench/shards/500x375-s1000-q90-v2/{000000..000031}.tar'
L='/tmp/bench/shards/1024x768-s1000-q90-v2/{000000..000015}.tar'
run b32-photo-new "$P" python3 -m clip_fabric predict --model.name ViT-B-32
run b32-photo-old "$P" .old/run.sh predict --model.name ViT-B-32
run l14-photo-new "$P" python3 -m clip_fabric predict --model.name ViT-L-14
run b32-500-new "$U" python3 -m clip_fabric predict --model.name ViT-B-32
run b32-500-old "$U" .old/run.sh predict --model.name ViT-B-32
run b32-1024-new "$L" python3 -m clip_fabric predict --model.name ViT-B-32
PYTHONPATH=/tmp/site:$PWD timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -x 2>&1 | tail -4
