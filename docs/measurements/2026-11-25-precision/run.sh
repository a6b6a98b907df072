#!/usr/bin/env bash
# The measurements of docs/precision.md: verify-precision on random-init ViT-B-32 and ViT-L-14 (the
# compute is that of trained weights), every precision against float32, and FP8 where it cannot run.
# Usage (repo root): bash docs/measurements/2026-11-25-precision/run.sh OUT_DIR
set -u
out=${1:?output folder}
vp() {  # verify-precision through jsonargparse, as `python -m clip_fabric verify-precision` will run it
    python3 -c 'import sys
from jsonargparse import CLI, set_parsing_settings
from clip_fabric.verify_precision import setup
set_parsing_settings(docstring_parse_attribute_docstrings=True)
try:
    CLI(setup, as_positional=False)
except ValueError as err:
    sys.exit(f"clip_fabric: error: {err}")' "$@"
}
b32="--model.name ViT-B-32 --data.num_samples 4096 --data.batch_size 1024 --data.shard_size 1024 --data.num_workers 4"
l14="--model.name ViT-L-14 --data.num_samples 1024 --data.batch_size 256 --data.shard_size 128 --data.num_workers 8"
vp $b32 --precision 16-mixed,bf16-mixed,16-true,bf16-true,auto --output "$out/vitb32.json" 2>&1 | grep -v Warning
vp $b32 --precision 32-true --tf32 true --output "$out/vitb32_tf32.json" 2>&1 | grep -v Warning
vp $l14 --precision 16-mixed,bf16-mixed,16-true,bf16-true --output "$out/vitl14.json" 2>&1 | grep -v Warning
vp $l14 --precision 32-true --tf32 true --output "$out/vitl14_tf32.json" 2>&1 | grep -v Warning
vp $b32 --precision fp8; echo "fp8 exit status: $?"
