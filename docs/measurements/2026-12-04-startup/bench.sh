#!/bin/bash
# Start-up of the CLI (docs/startup.md): the fastest of N runs of `import torch`, `--help`, `doctor`
# and a 64-sample tiny-model CPU predict, from the command to the process's exit.
# usage: bench.sh REPO [N]   (run from anywhere; REPO is the checkout to measure)
set -u
REPO=$(cd "$1" && pwd); N=${2:-3}; PY=${PYTHON:-python}; cd "$REPO"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/tiny-clip.json" <<'JSON'
{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
JSON
export PYTHONPATH=$REPO HF_HUB_OFFLINE=1
t() {  # seconds "$@" took; a failed command is an error, not a time
    local s e; s=$(date +%s.%N); "$@" >/dev/null 2>"$TMP/err" || { tail -3 "$TMP/err" >&2; exit 1; }
    e=$(date +%s.%N); echo "$e - $s" | bc
}
best() { sort -n | head -1; }
echo "import torch   $(for _ in $(seq "$N"); do t "$PY" -c 'import torch'; done | best)"
echo "--help         $(for _ in $(seq "$N"); do t "$PY" -m clip_fabric --help; done | best)"
echo "doctor         $(for _ in $(seq "$N"); do t "$PY" -m clip_fabric doctor; done | best)"
echo "predict 64     $(for _ in $(seq "$N"); do rm -rf "$TMP/out"; t "$PY" -m clip_fabric predict \
    --model.config "$TMP/tiny-clip.json" --data.num_samples 64 --accelerator cpu --output.dir "$TMP/out"; done | best)"
