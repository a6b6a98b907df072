#!/usr/bin/env bash
# Issue 5, 2026-11-25, third call of the night session: the reported run. docs/benchmarks.md's command (both models, both image
# sizes, --data.decode auto as a user gets it, naive loop), then the GPU test of auto.
# From the repository root: bash THIS_FILE OUT_DIR
set -u
OUT=${1:?usage: run3.sh OUT_DIR}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
LOG=$OUT/log3.txt
W=/tmp/bench
quiet() { grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]\|os.fork\|tar_file_expander"; }
{ git log -1 --format='commit %H'; nvidia-smi --query-gpu=name --format=csv,noheader; } >>"$LOG" 2>&1
echo "== 1. benchmark" >>"$LOG"
timeout 480 python3 -m clip_fabric benchmark --work_dir $W --models ViT-B-32,ViT-L-14 --precision bf16-true \
    --image_sizes 500x375,1024x768 --decode auto --devices 1 --timeout_s 100 \
    --output $OUT/benchmark.json --chart $OUT/benchmark.png 2>&1 | quiet >>"$LOG"
mkdir -p $OUT/logs && cp $W/logs/*.out $W/logs/*.cmd $OUT/logs/ 2>/dev/null
echo "== 2. the GPU test of auto" >>"$LOG"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k auto 2>&1 | tail -3 >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/logs/*.err 2>/dev/null); do echo "-- $f"; tail -20 "$f"; done >>"$LOG" 2>&1
tail -c 9000 "$LOG"
