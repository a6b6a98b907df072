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


def resolve_num_workers(num_workers: int | str, local_ranks: int = 1, batch_bytes: int = 0) -> int:
    """``--data.num_workers``, or ``auto``'s count capped by shared memory for batches of ``batch_bytes``."""
    if num_workers != "auto":
        return int(num_workers)
    workers = auto_num_workers(local_ranks)
    capped = cap_by_shared_memory(workers, batch_bytes, local_ranks)
    if capped < workers:
        log.warning(
            "--data.num_workers auto: %d workers, not %d: /dev/shm holds too few batches of %.0f MB "
            "(raise the container's --shm-size for more)", capped, workers, batch_bytes / 1e6,
        )  # fmt: skip
    return capped


PREFETCH = 2  # batches each DataLoader worker keeps ready (its default prefetch_factor)


def cap_by_shared_memory(
    workers: int, batch_bytes: int, local_ranks: int = 1, free: int | None = None
) -> int:
    """At most as many workers as half of the free shared memory (``/dev/shm``, where worker batches
    travel) holds batches in flight for, shared among the node's ranks: a container's small default
    ``--shm-size`` otherwise ends the run with a bus error in a worker."""
    if batch_bytes <= 0:
        return workers
    if free is None:
        try:
            stat = os.statvfs("/dev/shm")
        except OSError:
            return workers
        free = stat.f_bavail * stat.f_frsize
    fits = free // 2 // max(local_ranks, 1) // (PREFETCH * batch_bytes)
    return max(1, min(workers, fits))


def auto_shard_size(count: int) -> int:
    """Samples per shard of a listing of ``count``: about ``TARGET_SHARDS`` shards, so that the workers of
    many ranks all get shards, but no shard below one full batch (batches never straddle shards) nor
    above ``MAX_SHARD`` rows (one output file each). It depends on the count alone, so a rerun on
    another number of ranks or workers finds the same shards to resume."""
    return min(max(-(-count // TARGET_SHARDS), MIN_SHARD), MAX_SHARD)
