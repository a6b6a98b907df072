#!/usr/bin/env bash
# Issue 8's 4-GPU runs (kind nvidia-h100-x4 or -h200-x4), from the repository root:
#   bash docs/measurements/2026-11-26-x4/run.sh OUT_DIR
# A. rows: ddp, hybrid (--mode both, --mode pair) and tensor_parallel (2x2 and 4) on 4 GPUs with NCCL
#    against ddp on 1 GPU: ViT-B-32, 32-true, float32 outputs, 4096 synthetic samples in 16 shards.
# B. DDP scaling of end-to-end throughput on 1, 2 and 4 GPUs: the benchmark command, ViT-B-32 and
#    ViT-L-14, 200,000 500x375 JPEGs, --decode auto, each rank with the machine's CPUs / ranks workers.
set -u
OUT=${1:?usage: run.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CMP=docs/measurements/2026-11-25-h100x2-multigpu/compare.py
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
W=/tmp/x4 && rm -rf $W && mkdir -p $W/logs
LOG=$OUT/log.txt SUMMARY=$OUT/summary.txt
{ nvidia-smi --query-gpu=index,name --format=csv,noheader; nproc; } >>"$LOG" 2>&1
note() { echo "$*" | tee -a "$SUMMARY"; }
note "4-GPU runs on $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs), $(nproc) cores"

P=(python3 -m clip_fabric predict --accelerator cuda --data.format synthetic --timeout_s 120
   --data.num_samples 4096 --data.shard_size 256 --data.batch_size 128 --data.num_workers 4
   --precision 32-true --output.dtype float32 --model.name ViT-B-32)
run_a() { # NAME PORT ARGS... : one predict run in the background
    local name=$1 port=$2; shift 2
    (MASTER_PORT=$port timeout -k 10 170 "${P[@]}" "$@" --output.dir $W/$name >$W/logs/$name.txt 2>&1
     echo "step $name rc=$?" >>"$SUMMARY") &
}
run_a a_ref 29701 --strategy ddp --devices 1 --mode both
run_a a_ddp4 29702 --strategy ddp --devices 4 --mode both
run_a a_hy4_both 29703 --strategy hybrid --devices 4 --mode both
run_a a_hy4_pair 29704 --strategy hybrid --devices 4 --mode pair
run_a a_tp2x2 29705 --strategy tensor_parallel --devices 4 --tensor_parallel_size 2 --mode image
run_a a_tp4 29706 --strategy tensor_parallel --devices 4 --tensor_parallel_size 4 --mode image
wait
python3 $CMP rows $W/a_ref ddp4_both=$W/a_ddp4 hybrid4_both=$W/a_hy4_both hybrid4_pair=$W/a_hy4_pair \
    tensor_parallel_2x2_image=$W/a_tp2x2 tensor_parallel_4_image=$W/a_tp4 --min_cos 0.9999 --max_sim_diff 1e-4 \
    --json $OUT/rows.json 2>&1 | tee -a "$SUMMARY"
for f in $W/logs/a_*.txt; do grep -q "Traceback\|Error" "$f" && { echo "-- $f"; tail -15 "$f"; }; done >>"$LOG" 2>&1

echo "== B. DDP scaling" >>"$LOG"
timeout 400 python3 -m clip_fabric benchmark --work_dir $W/bench --models ViT-B-32,ViT-L-14 --precision bf16-true \
    --image_sizes 500x375 --num_images 200000 --decode auto --devices '[1,2,4]' --naive false --timeout_s 120 \
    --output $OUT/scaling.json --chart $OUT/scaling.png 2>&1 \
    | grep -v "Warning\|warn(\|NO PRETRAINED\|No pretrained\|it/s\]\|samples/s\]" >>"$LOG"
for f in $(grep -l "Traceback\|Error\|error:" $W/bench/logs/*.err 2>/dev/null); do echo "-- $f"; tail -20 "$f"; done >>"$LOG" 2>&1
tail -c 6000 "$LOG"
