#!/usr/bin/env bash
# Issue 5, third call (nvidia-h100-x1): GPU decoding in the main process beside the naive loop in one
# run; GPU decoding in 4 DataLoader workers (16 did not finish in run2.sh); the GPU decode test fixed
# since run2.sh. From the repository root: bash THIS_FILE OUT_DIR
set -u
OUT=${1:?usage: run3.sh OUT_DIR}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
LOG=$OUT/log3.txt
W=/tmp/bench
B=(python3 -m clip_fabric benchmark --work_dir $W --precision bf16-true --shard_size 1000 --batch_size 1024
   --devices 1 --timeout_s 50 --models ViT-B-32 --image_sizes 500x375 --num_images 32000 --decode gpu)
quiet() { grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]\|os.fork\|tar_file_expander"; }
git log -1 --format='commit %H' >>"$LOG" 2>&1
echo "== 1. ViT-B-32 500x375: model only, gpu decode in the main process, naive (one run)" >>"$LOG"
timeout 130 "${B[@]}" --num_workers 16 --naive true --output $OUT/b32_500_main_naive.json \
    --chart $OUT/b32_500_main_naive.png 2>&1 | quiet >>"$LOG"
echo "== 2. gpu decode in 4 DataLoader workers" >>"$LOG"
timeout 70 "${B[@]}" --num_workers 4 --naive false --model_seconds 0.5 \
    --predict_args "--data.gpu_decode_in_workers true" --output $OUT/b32_500_workers4.json \
    --chart $W/w4.png 2>&1 | quiet >>"$LOG"
echo "== 3. the GPU decode test" >>"$LOG"
timeout 60 python3 -m pytest -q -s tests/test_gpu.py -k matches_pil_preprocess -p no:cacheprovider 2>&1 \
    | grep -v "Warning\|warn(" | tail -30 >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/logs/*.err 2>/dev/null); do echo "-- $f"; tail -20 "$f"; done >>"$LOG" 2>&1
tail -c 9000 "$LOG"
