#!/usr/bin/env bash
# clip_fabric on one node: one task (rank) per GPU, Fabric reads the ranks from SLURM's variables.
#   sbatch slurm/1node.sh [CONFIG] [predict options...]     (submit from the repository root)
#   sbatch --partition=a100 --gpus-per-node=4 --ntasks-per-node=4 slurm/1node.sh configs/ddp.yaml \
#       --data.source 'shards/{000000..000999}.tar' --output.dir out/run1
# sbatch options override the #SBATCH lines below; keep --ntasks-per-node equal to --gpus-per-node.
# Preemption: SLURM sends SIGUSR1 120 s before the end (to every task: no "B:"), predict finishes its open
# shards and runs `scontrol requeue`; the job comes back (--requeue) and resumes from the done shards.
#SBATCH --job-name=clip-fabric
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
CONFIG="${1:-configs/ddp.yaml}"
shift || true

echo "clip_fabric: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}: config ${CONFIG}"
doctor_first  # with CLIP_FABRIC_DOCTOR=1, every node is checked first (slurm/env.sh)
# --devices and --num_nodes come from the allocation, so that the sbatch overrides above are enough and
# Fabric's check (devices x nodes == SLURM_NTASKS) holds; options after CONFIG come last and win.
srun --kill-on-bad-exit=1 "$PYTHON" -m clip_fabric predict --config "$CONFIG" \
    --devices "$SLURM_NTASKS_PER_NODE" --num_nodes "$SLURM_JOB_NUM_NODES" "$@"
