#!/usr/bin/env bash
# Issue 5, second call on one H100 with 16 cores (nvidia-h100-x1): GPU decoding in the DataLoader
# workers against the main process, the cpu path, the naive loop, ViT-L-14 and 1024x768, then the GPU
# tests. From the repository root: bash THIS_FILE OUT_DIR
set -u
OUT=${1:?usage: run2.sh OUT_DIR}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
LOG=$OUT/log2.txt
W=/tmp/bench
B=(python3 -m clip_fabric benchmark --work_dir $W --precision bf16-true --shard_size 1000 --batch_size 1024
   --devices 1 --num_workers 16 --timeout_s 60)
quiet() { grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]\|os.fork\|tar_file_expander"; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nproc
    git log -1 --format='commit %H' 2>/dev/null
} >>"$LOG" 2>&1

echo "== 1. ViT-B-32 500x375: model only; gpu decode in workers; cpu; naive" >>"$LOG"
timeout 170 "${B[@]}" --models ViT-B-32 --image_sizes 500x375 --num_images 64000 --decode gpu,cpu --naive true \
    --output $OUT/b32_500.json --chart $OUT/b32_500.png 2>&1 | quiet >>"$LOG"
echo "== 2. ViT-B-32 500x375: gpu decode in the main process (the same shards)" >>"$LOG"
timeout 60 "${B[@]}" --models ViT-B-32 --image_sizes 500x375 --num_images 64000 --decode gpu --naive false \
    --model_seconds 0.5 --predict_args "--data.gpu_decode_in_workers false" --output $OUT/b32_500_main.json \
    --chart $W/main.png 2>&1 | quiet >>"$LOG"
echo "== 3. ViT-L-14 500x375, gpu decode in workers" >>"$LOG"
timeout 75 "${B[@]}" --models ViT-L-14 --image_sizes 500x375 --num_images 64000 --decode gpu --naive false \
    --e2e_seconds 8 --output $OUT/l14_500.json --chart $W/l14.png 2>&1 | quiet >>"$LOG"
echo "== 4. GPU tests" >>"$LOG"
timeout 200 python3 -m pytest -q -s tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -v "Warning\|warn(" | tail -30 >>"$LOG"
echo "== 5. ViT-B-32 1024x768, gpu decode in workers" >>"$LOG"
timeout 75 "${B[@]}" --models ViT-B-32 --image_sizes 1024x768 --num_images 16000 --decode gpu --naive false \
    --model_seconds 0.5 --output $OUT/b32_1024.json --chart $W/b1024.png 2>&1 | quiet >>"$LOG"
echo "== failed runs: the end of their logs" >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/logs/*.err 2>/dev/null); do echo "-- $f"; tail -30 "$f"; done >>"$LOG" 2>&1
tail -c 11000 "$LOG"
