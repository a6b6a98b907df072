#!/usr/bin/env bash
# The throughput (issue 5) and multi-GPU (issue 8) measurements of 2026-11-25, on one nvidia-h100-x2
# host (2 H100, 32 cores), in one call. From the repository root: bash THIS_FILE OUT_DIR
# Single-GPU figures run on cores 0-15 only (taskset), as the issue's targets are for one H100 with 16
# cores; the 2-GPU run has all 32 (16 per GPU). Every step is capped so one failure costs only itself.
set -u
OUT=${1:?usage: run.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
LOG=$OUT/log.txt
W=/tmp/bench
B=(python3 -m clip_fabric benchmark --work_dir $W --precision bf16-true --shard_size 1000 --batch_size 1024)
quiet() { grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]"; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nproc
    python3 -c "import torch, torchvision, lightning, open_clip; print(torch.__version__, torchvision.__version__, lightning.__version__, open_clip.__version__)"
    git log -1 --format='commit %H' 2>/dev/null
} >>"$LOG" 2>&1

echo "== 1. ViT-B-32 data-parallel scaling, 2 GPUs (500x375 JPEGs made here, with all 32 cores)" >>"$LOG"
timeout 120 "${B[@]}" --models ViT-B-32 --image_sizes 500x375 --num_images 64000 --decode gpu --devices 2 \
    --num_workers 16 --naive false --timeout_s 70 --output $OUT/benchmark_2gpu.json --chart $W/2gpu.png 2>&1 | quiet >>"$LOG"

echo "== 2. ViT-B-32 on one H100 and 16 cores: model only, end to end (gpu, cpu decode), naive" >>"$LOG"
taskset -c 0-15 timeout 210 "${B[@]}" --models ViT-B-32 --image_sizes 500x375,1024x768 --num_images "[64000,16000]" \
    --decode gpu,cpu --devices 1 --num_workers 16 --naive true --timeout_s 60 \
    --output $OUT/benchmark_vitb32.json --chart $OUT/benchmark_vitb32.png 2>&1 | quiet >>"$LOG"

echo "== 3. ViT-L-14 on one H100 and 16 cores: model only, end to end (gpu decode)" >>"$LOG"
taskset -c 0-15 timeout 90 "${B[@]}" --models ViT-L-14 --image_sizes 500x375 --num_images 64000 --decode gpu \
    --devices 1 --num_workers 16 --naive false --timeout_s 60 --e2e_seconds 8 \
    --output $OUT/benchmark_vitl14.json --chart $W/l14.png 2>&1 | quiet >>"$LOG"

echo "== 4. Strategies on 2 GPUs with NCCL against one GPU (issue 8, phase A)" >>"$LOG"
BUDGET_S=${MULTI_BUDGET_S:-90} timeout 100 bash docs/measurements/2026-11-25-h100x2-multigpu/run.sh $W/multi >>"$LOG" 2>&1
cp $W/multi/summary.txt $OUT/multigpu_summary.txt 2>/dev/null
cp $W/multi/results.json $OUT/multigpu_results.json 2>/dev/null

echo "== failed runs: the end of their logs" >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/logs/*.err 2>/dev/null); do echo "-- $f"; tail -40 "$f"; done >>"$LOG" 2>&1
cat "$LOG" | tail -150
