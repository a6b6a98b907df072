# Sourced by the slurm/*.sh job scripts: the environment every rank of a clip_fabric job sees.
# Each variable keeps a value the user exported before `sbatch` (sbatch passes the environment on).
#
# Inference has few collectives (a barrier at start and end, one all-reduce of counts; hybrid adds
# point-to-point sends of features), so NCCL tuning changes start-up and failure behaviour more than
# speed. The article's setup script set NCCL_DEBUG=INFO and NCCL_P2P_LEVEL=NVL; see below for why only a
# quieter NCCL_DEBUG is kept.

# NCCL_DEBUG: WARN prints NCCL's errors only. INFO (the article's value) prints the topology, rings and
# the network transport chosen (IB or socket) on every rank: set NCCL_DEBUG=INFO when diagnosing a
# start-up hang or timeout (docs/troubleshooting.md), not on every run.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# NCCL_P2P_LEVEL is NOT set: the article's NCCL_P2P_LEVEL=NVL forbids GPU peer-to-peer over PCIe, which
# slows PCIe-only nodes (T4, PCIe V100/A100) instead of helping; NCCL picks the path from the detected
# topology. Export NCCL_P2P_DISABLE=1 before sbatch only to test whether P2P is what hangs a job.

# NCCL_SOCKET_IFNAME / NCCL_IB_HCA are NOT set: NCCL finds the InfiniBand HCAs and the interface itself.
# Export them before sbatch where nodes have several networks and NCCL picks the wrong one (e.g.
# NCCL_SOCKET_IFNAME=ib0 or =eth0, NCCL_IB_HCA=mlx5); `python -m clip_fabric doctor` lists what it sees.

# TORCH_NCCL_ASYNC_ERROR_HANDLING is NOT set: torch's default already ends a rank whose collective fails
# or outlives --timeout_s, so srun --kill-on-bad-exit ends the step instead of leaving it hanging.

# One OpenMP thread pool per task sized to its CPUs: without it each of the 8 ranks of a node starts
# one thread per core of the whole node and they oversubscribe the CPUs the DataLoader workers need.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# Logs in the job log as they happen, not when a buffer fills (a killed job loses its buffer).
export PYTHONUNBUFFERED=1

# The interpreter of the environment clip_fabric is installed in; override with PYTHON=/path/to/python.
PYTHON="${PYTHON:-python}"

# CLIP_FABRIC_DOCTOR=1 (exported before sbatch): every task first runs `clip_fabric doctor`; the tasks meet
# rank 0 at the rendezvous address and port, as predict's will, and rank 0 prints a line per node (its
# address, its ranks, its GPUs, its problems). A blocker on any node ends the job before predict starts.
doctor_first() {
    if [[ "${CLIP_FABRIC_DOCTOR:-0}" == 1 ]]; then
        srun --kill-on-bad-exit=1 "$PYTHON" -m clip_fabric doctor
    fi
}
