#!/usr/bin/env bash
# clip_fabric on 8 nodes x 8 GPUs (64 ranks, data parallel): one task per GPU, Fabric reads the ranks
# from SLURM's variables and rank 0's node is the rendezvous (port 15000 + last 4 digits of the job id,
# or MASTER_PORT if exported).
#   sbatch slurm/8node.sh [CONFIG] [predict options...]     (submit from the repository root)
#   A100 (the default partition name here): bf16-mixed, as configs/ddp.yaml sets.
#   V100 (no bf16):  sbatch --partition=v100 slurm/8node.sh configs/ddp.yaml --precision 16-mixed
#   4 nodes:         sbatch --nodes=4 slurm/8node.sh ...
# sbatch options override the #SBATCH lines below; keep --ntasks-per-node equal to --gpus-per-node.
# Preemption: SIGUSR1 120 s before the end goes to every task (no "B:"); predict finishes its open shards,
# rank 0 runs `scontrol requeue`, and the requeued job resumes from the done shards (docs/slurm.md).
#SBATCH --job-name=clip-fabric-8n
#SBATCH --partition=a100
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
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
