#!/usr/bin/env bash
# Issue 8 on one host of 2 GPUs (nvidia-h100-x2), from the repository root:
#   bash docs/measurements/2026-11-25-h100x2-multigpu/run.sh OUT_DIR
# A. rows: model_parallel, hybrid (--mode both and pair), tensor_parallel and ddp on 2 GPUs (NCCL) against
#    ddp on 1 GPU, same synthetic input, random-init ViT-B-32 in 32-true, float32 outputs.
# C. tensor_parallel: random-init ViT-bigG-14 vision tower split over the 2 GPUs against the unsplit tower
#    on 1 GPU (--mode image, bf16-mixed): min cosine and both throughputs.
# B. pair scoring (ViT-L-14, bf16-mixed): samples/s of ddp on 2 GPUs against model_parallel and hybrid.
# Every step runs under `timeout` (its process group is killed at its limit) and within one overall budget
# (BUDGET_S, default 280 s): a step that fails or hangs costs its own result only; steps without time
# left are skipped and say so. Writes OUT_DIR/summary.txt (one line per step, the comparisons),
# OUT_DIR/results.json (compare.py's records) and OUT_DIR/log.txt (environment, every step's output).
# Sizes, models and the accelerator come from the environment, so the same script runs on the CPU:
#   ACCEL=cpu CHECK_MODEL='--model.config /tmp/tiny-clip.json' ... (see the defaults below).
set -u
OUT=${1:?usage: run.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-280}))

# NVLink multicast stays off (the device tool's README); these reach every rank Fabric starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}

PY=${PY:-python3}
ACCEL=${ACCEL:-cuda}
WORK=${WORK:-/tmp/issue8}
CHECK_MODEL=${CHECK_MODEL:---model.name ViT-B-32}
PAIR_MODEL=${PAIR_MODEL:---model.name ViT-L-14}
BIG_MODEL=${BIG_MODEL:---model.name ViT-bigG-14}
N_CHECK=${N_CHECK:-2048} SHARD_CHECK=${SHARD_CHECK:-256} BATCH_CHECK=${BATCH_CHECK:-128} W_CHECK=${W_CHECK:-4}
N_BIG=${N_BIG:-1024} SHARD_BIG=${SHARD_BIG:-128} BATCH_BIG=${BATCH_BIG:-64} W_BIG=${W_BIG:-8}
PREC_BIG=${PREC_BIG:-bf16-mixed}
# Pair scoring: one shard per worker of the process that reads (ddp: each of its 2 ranks gets half the
# workers), so no worker is left alone with a last shard at the end.
W_PAIR=${W_PAIR:-24} N_PAIR=${N_PAIR:-16384} BATCH_PAIR=${BATCH_PAIR:-256}
SHARD_PAIR=$((N_PAIR / W_PAIR)) && N_PAIR=$((SHARD_PAIR * W_PAIR))
PREC_PAIR=${PREC_PAIR:-bf16-mixed}
# Phase A's runs at once (they check rows, not speed); sequential where GPUs are not shared.
PARALLEL=${PARALLEL:-1}

LOG=$OUT/log.txt SUMMARY=$OUT/summary.txt RESULTS=$OUT/results.json
rm -rf "$WORK" && mkdir -p "$WORK/logs"
: >"$LOG" && : >"$SUMMARY" && rm -f "$RESULTS"
# EXTRA_ARGS go to every run, e.g. EXTRA_ARGS='--data.decode pil' (default: predict's own, auto).
# shellcheck disable=SC2206  # a list of words
PREDICT=("$PY" -m clip_fabric predict --accelerator "$ACCEL" --data.format synthetic --timeout_s 120 ${EXTRA_ARGS:-})

note() { echo "$*" | tee -a "$SUMMARY"; }

step() { # step NAME CAP CMD... : CMD under min(CAP, time left), output in $WORK/logs/NAME.txt
    local name=$1 cap=$2 left limit rc t0 ms
    shift 2
    left=$((DEADLINE - $(date +%s) - 5))
    limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "skipped: ${left}s left of the budget" >"$WORK/logs/$name.txt"
        echo "$name skip 0 0" >"$WORK/logs/$name.rc"
        return 0
    fi
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" >"$WORK/logs/$name.txt" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    echo "$name $rc $((ms / 1000)).$((ms % 1000 / 100)) $limit" >"$WORK/logs/$name.rc"
    echo "+ $*" >>"$WORK/logs/$name.txt"
}

last_line() { tr '\r' '\n' <"$WORK/logs/$1.txt" | grep -v -e '^+ ' -e '^\s*$' | tail -1 | cut -c1-160; }

report() { # report NAME... : one summary line each (rc 124/137 = hit its limit), their output into log.txt
    local name rc secs limit
    for name in "$@"; do
        read -r _ rc secs limit <"$WORK/logs/$name.rc"
        note "$(printf 'step %-16s rc=%-4s %7.1f s (limit %s s)%s' "$name" "$rc" "$secs" "$limit" \
            "$( [ "$rc" = 0 ] || echo "  <-- $(last_line "$name")")")"
        { echo "===== $name rc=$rc ${secs}s"; tr '\r' '\n' <"$WORK/logs/$name.txt" | grep -v '^\s*$'; } >>"$LOG"
    done
}

gpu_watch() { # gpu_watch NAME : sample utilisation while a throughput step runs (pid in $WATCH)
    WATCH=
    command -v nvidia-smi >/dev/null || return 0
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
        >"$WORK/logs/$1.gpu" 2>/dev/null &
    WATCH=$!
}

gpu_report() { # gpu_report NAME : mean utilisation between each GPU's first and last busy sample
    [ -n "$WATCH" ] || return 0
    kill "$WATCH" 2>/dev/null
    wait "$WATCH" 2>/dev/null
    note "      $1 gpu: $(awk -F', *' '{i=$1; n[i]++; u[i,n[i]]=$2; if ($2 > 0) {if (!f[i]) f[i]=n[i]; l[i]=n[i]}
        if ($3 > m[i]) m[i]=$3}
        END {for (i in n) {s=0; c=0; for (k=f[i]; f[i] && k<=l[i]; k++) {s+=u[i,k]; c++}
             printf "gpu%s busy-window util %.0f%% over %.1f s, max mem %d MiB; ", i, c ? s/c : 0, c/2, m[i]}}' \
        "$WORK/logs/$1.gpu")"
}

compare() { "$PY" "$HERE/compare.py" "$@" --json "$RESULTS" 2>&1 | tee -a "$SUMMARY"; }

# ---- environment ----
{
    echo "date: $(date -u +%FT%TZ)  host cores: $(nproc)  commit: $(git rev-parse --short HEAD 2>/dev/null)"
    git status --short 2>/dev/null | head -30
    free -g | head -2
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_mode --format=csv
        nvidia-smi topo -m
    fi
    timeout 60 "$PY" -c "import torch, lightning, open_clip; print('torch', torch.__version__, 'lightning',
lightning.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.version.cuda, 'gpus',
torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
    env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)' | sort
} >>"$LOG" 2>&1
if command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=compute_mode --format=csv,noheader | grep -qv Default; then
    PARALLEL=0 # exclusive-process GPUs: one run at a time
fi
note "issue 8 on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs) \
$(nproc) cores; accelerator $ACCEL; phase A parallel=$PARALLEL; budget ${BUDGET_S:-280} s"

# ---- A: same rows as one device, 32-true ----
CHECK=(--data.num_samples "$N_CHECK" --data.shard_size "$SHARD_CHECK" --data.batch_size "$BATCH_CHECK"
    --data.num_workers "$W_CHECK" --precision 32-true --output.dtype float32 $CHECK_MODEL)
A_RUNS=(a_ref a_ddp2_both a_mp_both a_hy_both a_mp_pair a_hy_pair a_tp2_image)
a_args() {
    case $1 in
    a_ref) echo "--strategy ddp --devices 1 --mode both" ;;
    a_ddp2_both) echo "--strategy ddp --devices 2 --mode both" ;;
    a_mp_both) echo "--strategy model_parallel --devices 2 --mode both" ;;
    a_hy_both) echo "--strategy hybrid --devices 2 --mode both" ;;
    a_mp_pair) echo "--strategy model_parallel --devices 2 --mode pair" ;;
    a_hy_pair) echo "--strategy hybrid --devices 2 --mode pair" ;;
    a_tp2_image) echo "--strategy tensor_parallel --devices 2 --tensor_parallel_size 2 --mode image" ;;
    esac
}
port=29610
for run in "${A_RUNS[@]}"; do
    port=$((port + 1))
    # shellcheck disable=SC2046  # a_args is a list of words
    cmd=(env MASTER_PORT=$port "${PREDICT[@]}" "${CHECK[@]}" $(a_args "$run") --output.dir "$WORK/$run")
    if [ "$PARALLEL" = 1 ]; then step "$run" 150 "${cmd[@]}" & else step "$run" 60 "${cmd[@]}"; fi
done
wait
report "${A_RUNS[@]}"
compare rows "$WORK/a_ref" ddp2_both="$WORK/a_ddp2_both" model_parallel_both="$WORK/a_mp_both" \
    hybrid_both="$WORK/a_hy_both" model_parallel_pair="$WORK/a_mp_pair" hybrid_pair="$WORK/a_hy_pair" \
    tensor_parallel_image="$WORK/a_tp2_image" --min_cos 0.9999 --max_sim_diff 1e-4

# ---- C: tensor-parallel vision tower against the unsplit one ----
BIG=(--data.num_samples "$N_BIG" --data.shard_size "$SHARD_BIG" --data.batch_size "$BATCH_BIG"
    --data.num_workers "$W_BIG" --precision "$PREC_BIG" --output.dtype float32 --mode image $BIG_MODEL)
gpu_watch c_ref_1gpu
step c_ref_1gpu 100 env MASTER_PORT=29631 "${PREDICT[@]}" "${BIG[@]}" --strategy ddp --devices 1 \
    --output.dir "$WORK/c_ref_1gpu"
report c_ref_1gpu
gpu_report c_ref_1gpu
gpu_watch c_tp_2gpu
step c_tp_2gpu 110 env MASTER_PORT=29632 "${PREDICT[@]}" "${BIG[@]}" --strategy tensor_parallel --devices 2 \
    --tensor_parallel_size 2 --output.dir "$WORK/c_tp_2gpu"
report c_tp_2gpu
gpu_report c_tp_2gpu
compare rows "$WORK/c_ref_1gpu" tensor_parallel_big="$WORK/c_tp_2gpu" --min_cos 0.99
compare speed big_ddp_1gpu="$WORK/c_ref_1gpu" big_tensor_parallel_2gpu="$WORK/c_tp_2gpu"

# ---- B: pair-scoring throughput on the 2 GPUs ----
PAIR=(--data.num_samples "$N_PAIR" --data.shard_size "$SHARD_PAIR" --data.batch_size "$BATCH_PAIR"
    --precision "$PREC_PAIR" --mode pair $PAIR_MODEL)
for run in b_ddp_2gpu b_mp_2gpu b_hybrid_2gpu; do
    case $run in
    b_ddp_2gpu) args=(--strategy ddp --data.num_workers $((W_PAIR / 2))) ;;
    b_mp_2gpu) args=(--strategy model_parallel --data.num_workers "$W_PAIR") ;;
    b_hybrid_2gpu) args=(--strategy hybrid --data.num_workers "$W_PAIR") ;;
    esac
    gpu_watch $run
    step $run 75 env MASTER_PORT=$((port += 1)) "${PREDICT[@]}" "${PAIR[@]}" "${args[@]}" --devices 2 \
        --output.dir "$WORK/$run"
    report $run
    gpu_report $run
done
compare speed pair_ddp_2gpu="$WORK/b_ddp_2gpu" pair_model_parallel_2gpu="$WORK/b_mp_2gpu" \
    pair_hybrid_2gpu="$WORK/b_hybrid_2gpu"
compare rows "$WORK/b_ddp_2gpu" pair_model_parallel_bf16="$WORK/b_mp_2gpu" \
    pair_hybrid_bf16="$WORK/b_hybrid_2gpu" --max_sim_diff 0.02

note "total $(($(date +%s) - START)) s"
