"""The data path's sizes when left to ``auto``: decoding workers per rank, and samples per shard."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)
MAX_WORKERS = 32  # past this, worker start-up and memory cost more than a rank's batches need
MIN_SHARD, MAX_SHARD, TARGET_SHARDS = 1024, 10_000, 1024


def auto_num_workers(
    local_ranks: int = 1, cpus: int | None = None, env: Mapping[str, str] = os.environ
) -> int:
    """Workers for one rank: the CPUs it may use, less one for its main process. Under SLURM that is
    ``SLURM_CPUS_PER_TASK``, per rank where srun started one task per rank, shared among the
    ``local_ranks`` where one task started them all (Fabric's launcher in a one-task allocation);
    elsewhere the CPUs of this process's affinity mask (a container's or taskset's limit, not the
    machine's) shared among the ``local_ranks`` of the node."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    task_per_rank = int(env.get("SLURM_NTASKS", "1") or 1) > 1
    if per_task.isdigit():
        share = min(cpus, int(per_task)) // (1 if task_per_rank else max(local_ranks, 1))
    else:
        share = cpus // max(local_ranks, 1)
    return max(1, min(share - 1, MAX_WORKERS))


def resolve_num_workers(num_workers: int | str, local_ranks: int = 1) -> int:
    return auto_num_workers(local_ranks) if num_workers == "auto" else int(num_workers)


def auto_shard_size(count: int) -> int:
    """Samples per shard of a listing of ``count``: about ``TARGET_SHARDS`` shards, so that the workers of
    many ranks all get shards, but no shard below one full batch (batches never straddle shards) nor
    above ``MAX_SHARD`` rows (one output file each). It depends on the count alone, so a rerun on
    another number of ranks or workers finds the same shards to resume."""
    return min(max(-(-count // TARGET_SHARDS), MIN_SHARD), MAX_SHARD)
