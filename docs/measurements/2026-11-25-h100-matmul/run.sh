#!/usr/bin/env bash
# Issue 5, 2026-11-25, first call of the night session: the patch-embedding A/B (probe.py), then the benchmark of ViT-B-32 and
# ViT-L-14 on the current code (matmul patch embedding, gpu decode), naive loop in the same run.
# From the repository root: bash THIS_FILE OUT_DIR
set -u
OUT=${1:?usage: run.sh OUT_DIR}
D=docs/measurements/2026-11-25-h100-matmul
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
LOG=$OUT/log1.txt
W=/tmp/bench
quiet() { grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]\|os.fork\|tar_file_expander"; }
{ git log -1 --format='commit %H'; nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader;
  echo "mps: $(command -v nvidia-cuda-mps-control || echo none)"; } >>"$LOG" 2>&1
echo "== 1. probe.py" >>"$LOG"
timeout 170 python3 $D/probe.py 2>&1 | quiet >>"$OUT/probe.txt"
tail -n +1 "$OUT/probe.txt" | grep -v "^ \|^--\|^-\|^Name\|Self CPU\|Self CUDA" >>"$LOG"
echo "== 2. benchmark ViT-B-32 + ViT-L-14, 500x375, gpu decode, naive" >>"$LOG"
timeout 360 python3 -m clip_fabric benchmark --work_dir $W --models ViT-B-32,ViT-L-14 --precision bf16-true \
    --image_sizes 500x375 --decode gpu --devices 1 --batch_size 1024 --timeout_s 120 \
    --output $OUT/benchmark.json --chart $OUT/benchmark.png 2>&1 | quiet >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/logs/*.err 2>/dev/null); do echo "-- $f"; tail -20 "$f"; done >>"$LOG" 2>&1
tail -c 9000 "$LOG"
