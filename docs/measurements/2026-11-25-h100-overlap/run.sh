#!/usr/bin/env bash
# Issue 5 on one H100 with 16 cores (nvidia-h100-x1), in one call: the GPU tests, the GPU path's stages
# alone and overlapped, where predict makes the host wait, and the benchmark end to end.
# From the repository root: bash THIS_FILE OUT_DIR
set -u
OUT=${1:?usage: run.sh OUT_DIR}
HERE=$(dirname "$0")
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
LOG=$OUT/log.txt
W=/tmp/bench
B=(python3 -m clip_fabric benchmark --work_dir $W --precision bf16-true --shard_size 1000 --batch_size 1024
   --devices 1 --num_workers 16 --timeout_s 60)
quiet() { grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]"; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nproc
    python3 -c "import torch, torchvision, lightning, open_clip; print(torch.__version__, torchvision.__version__, lightning.__version__, open_clip.__version__)"
} >>"$LOG" 2>&1

echo "== 1. GPU tests" >>"$LOG"
timeout 170 python3 -m pytest -q -x -s tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -v "Warning\|warn(" | tail -30 >>"$LOG"

echo "== 2. stages, 500x375 and 1024x768" >>"$LOG"
timeout 60 python3 $HERE/stages.py 500x375 2>&1 | quiet >>"$LOG"
timeout 40 python3 $HERE/stages.py 1024x768 2>&1 | quiet >>"$LOG"

echo "== 3. ViT-B-32 500x375 end to end: gpu decode, gpu + 15% on the CPU workers, naive" >>"$LOG"
timeout 150 "${B[@]}" --models ViT-B-32 --image_sizes 500x375 --num_images 64000 --decode gpu --naive true \
    --output $OUT/b32_500.json --chart $OUT/b32_500.png 2>&1 | quiet >>"$LOG"
timeout 60 "${B[@]}" --models ViT-B-32 --image_sizes 500x375 --num_images 64000 --decode gpu --naive false \
    --model_seconds 0.5 --predict_args "--data.cpu_decode_share 0.15" --output $OUT/b32_500_share15.json \
    --chart $W/s15.png 2>&1 | quiet >>"$LOG"

echo "== 4. host waits in predict (gpu decode, 8 shards)" >>"$LOG"
timeout 60 python3 $HERE/syncs.py predict --data.format webdataset \
    --data.source "$W/shards/500x375-s1000-q90-v1/{000000..000007}.tar" --model.name ViT-B-32 \
    --precision bf16-true --data.batch_size 1024 --data.num_workers 8 --data.decode gpu \
    --output.dir /tmp/syncs --output.overwrite true 2>&1 | quiet | tail -25 >>"$LOG"

echo "== 5. ViT-B-32 1024x768 and ViT-L-14 500x375, gpu decode" >>"$LOG"
timeout 110 "${B[@]}" --models ViT-B-32 --image_sizes 1024x768 --num_images 16000 --decode gpu --naive false \
    --model_seconds 0.5 --output $OUT/b32_1024.json --chart $W/b1024.png 2>&1 | quiet >>"$LOG"
timeout 80 "${B[@]}" --models ViT-L-14 --image_sizes 500x375 --num_images 64000 --decode gpu --naive false \
    --e2e_seconds 8 --output $OUT/l14_500.json --chart $W/l14.png 2>&1 | quiet >>"$LOG"

echo "== failed runs: the end of their logs" >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/logs/*.err 2>/dev/null); do echo "-- $f"; tail -30 "$f"; done >>"$LOG" 2>&1
tail -c 11000 "$LOG"
