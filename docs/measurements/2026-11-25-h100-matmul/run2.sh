#!/usr/bin/env bash
# Issue 5, 2026-11-25, second call of the night session: the GPU tests, then the benchmark with the MLP's GELU in cuBLASLt's
# epilogue (bf16-true), ViT-B-32 and ViT-L-14, 500x375, gpu and cpu decode, naive loop, in one run.
# From the repository root: bash THIS_FILE OUT_DIR
set -u
OUT=${1:?usage: run2.sh OUT_DIR}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
LOG=$OUT/log2.txt
W=/tmp/bench
quiet() { grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]\|os.fork\|tar_file_expander"; }
{ git log -1 --format='commit %H'; nvidia-smi --query-gpu=name --format=csv,noheader; } >>"$LOG" 2>&1
echo "== 1. tests/test_gpu.py" >>"$LOG"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "Warning\|warn(" | tail -25 >>"$LOG"
echo "== 2. benchmark ViT-B-32 + ViT-L-14, 500x375, gpu and cpu decode, naive" >>"$LOG"
timeout 370 python3 -m clip_fabric benchmark --work_dir $W --models ViT-B-32,ViT-L-14 --precision bf16-true \
    --image_sizes 500x375 --decode gpu,cpu --devices 1 --batch_size 1024 --timeout_s 100 \
    --output $OUT/benchmark2.json --chart $OUT/benchmark2.png 2>&1 | quiet >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/logs/*.err 2>/dev/null); do echo "-- $f"; tail -20 "$f"; done >>"$LOG" 2>&1
tail -c 9000 "$LOG"
