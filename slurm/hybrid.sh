#!/usr/bin/env bash
# clip_fabric's hybrid strategy (configs/hybrid.yaml): ranks form pairs, the vision tower on one GPU and
# the text tower on its partner, pairs data parallel; for image-caption pair scoring (--mode pair/both).
#   sbatch slurm/hybrid.sh [CONFIG] [predict options...]    (submit from the repository root)
#   sbatch --nodes=4 slurm/hybrid.sh configs/hybrid.yaml --data.source 'pairs/{000000..000999}.tar'
# Each node must run an even number of tasks: the default --tower_layout adjacent pairs ranks (2g, 2g+1),
# which keeps a pair's point-to-point traffic inside one node (NVLink/PCIe, not the network).
# sbatch options override the #SBATCH lines below; keep --ntasks-per-node equal to --gpus-per-node.
# Preemption and requeue as in slurm/1node.sh. tests/test_slurm.py submits this script too (2 CPU tasks).
#SBATCH --job-name=clip-fabric-hybrid
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
source slurm/env.sh
CONFIG="${1:-configs/hybrid.yaml}"
shift || true
if (( SLURM_NTASKS_PER_NODE % 2 )); then
    echo "clip_fabric: hybrid pairs ranks within a node: use an even --ntasks-per-node, not ${SLURM_NTASKS_PER_NODE}" >&2
    exit 2
fi

echo "clip_fabric: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}: config ${CONFIG}"
doctor_first  # with CLIP_FABRIC_DOCTOR=1, every node is checked first (slurm/env.sh)
srun --kill-on-bad-exit=1 "$PYTHON" -m clip_fabric predict --config "$CONFIG" --strategy hybrid \
    --devices "$SLURM_NTASKS_PER_NODE" --num_nodes "$SLURM_JOB_NUM_NODES" "$@"
