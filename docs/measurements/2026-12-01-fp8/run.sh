#!/usr/bin/env bash
# Issue 18's FP8 measurement on one H200 (torch 2.11.0+cu130 image, no network), as run on 2026-12-01.
#
# STAGE holds what the machine lacks (../shared/DEVICE.md says how to fetch each with pip download):
#   $STAGE/wheels/*.whl   open_clip_torch 3.3.0, ftfy, wcwidth, torchao 0.17.0, transformer_engine 2.20.2
#                         (metapackage), nvdlfw_inspect, pydantic, pydantic_core, annotated_types,
#                         typing_inspection, importlib_metadata
#   $STAGE/transformer_engine_torch-2.20.2.tar.gz   (built here, about 90 s, while phase A runs)
#   /tmp/parts/part*      transformer_engine_cu13-2.20.2 (276 MB) split in 55 MiB parts, copied by earlier calls
# CODE is the folder whose clip_fabric is measured; PROBE the probe beside this file.
set -u
STAGE=${STAGE:-.fp8}
CODE=${CODE:-$STAGE}
PROBE=${PROBE:-$STAGE/probe.py}
OUT=${OUT:-/tmp/fp8out}
W=/tmp/fp8w
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT" $W/built $W/src
t0=$(date +%s)
core=$W/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
[ -f "$core" ] || cat /tmp/parts/part* > "$core"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$core" "$STAGE"/wheels/*.whl || exit 1
echo "installed in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv

# Transformer Engine's PyTorch extension, built in the background while phase A needs no TE.
(
  tar xzf "$STAGE"/transformer_engine_torch-2.20.2.tar.gz -C $W/src &&
  cd $W/src/transformer_engine_torch-2.20.2 &&
  PYTHONPATH=/tmp/site NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=12 \
    python3 -m pip wheel -q --no-build-isolation --no-deps --no-index -w $W/built . > $W/build.log 2>&1
  echo $? > $W/build.rc
) &

export PYTHONPATH=/tmp/site:$CODE
COMMON="--ref-dir /tmp/fp8ref --batch 256 --images 1024 --big-images 512"
# Phase A: float32 references, bf16-true and torchao (no Transformer Engine needed).
python3 "$PROBE" $COMMON --towers ViT-L-14,ViT-H-14,ViT-bigG-14 \
  --configs bf16-true,bf16-true-fp32norms,ao-row \
  --big-configs ao-row-split,ao-row-split-compiled,ao-tensor-split-compiled,bf16-true-compiled \
  --gemms --budget-s "${BUDGET_A:-230}" --out "$OUT"/results_A.json > "$OUT"/log_A.txt 2>&1
echo "phase A done at $(( $(date +%s) - t0 )) s"; grep -v "Warning\|warn(" "$OUT"/log_A.txt | tail -40

while [ ! -f $W/build.rc ]; do sleep 2; done
echo "build rc $(cat $W/build.rc) at $(( $(date +%s) - t0 )) s"; tail -c 3000 $W/build.log > "$OUT"/build_tail.log
python3 -m zipfile -e $W/built/transformer_engine_torch-*.whl /tmp/site/
python3 -c "import transformer_engine.pytorch as te; print('TE', te.is_fp8_available(return_reason=True))" 2>&1 | tail -2

# Phase B: Transformer Engine: Lightning's plugin as it was, the same with split attention and current
# scaling, and clip_fabric's fused blocks under each recipe; bf16-true again in this process; profiles.
# (On 2026-12-01 the fused rows came from a second call, results_D.json, after two bugs the first call
# found were fixed: its results_B.json holds the Lightning rows.)
python3 "$PROBE" $COMMON --towers ViT-L-14,ViT-H-14,ViT-bigG-14 \
  --configs bf16-true,te-lightning,te-lightning-split-current,te-fused-delayed-all,te-fused-current-all,te-fused-block-all,te-fused-current-image \
  --big-configs te-fused-current-all-fp8w \
  --profile bf16-true,te-lightning,te-lightning-split-current,te-fused-current-all,te-fused-delayed-all \
  --profile-out "$OUT"/profiles.txt --budget-s "${BUDGET_B:-300}" --out "$OUT"/results_B.json > "$OUT"/log_B.txt 2>&1
echo "phase B done at $(( $(date +%s) - t0 )) s"; grep -v "Warning\|warn(" "$OUT"/log_B.txt | tail -40
