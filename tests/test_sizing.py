"""The ``auto`` sizes of the data path: workers per rank from the CPUs a rank may use, shards by count."""

from __future__ import annotations

import pytest

from clip_fabric.data import chunk
from clip_fabric.data.sizing import MAX_WORKERS, auto_num_workers, auto_shard_size


@pytest.mark.parametrize(
    "cpus, local_ranks, env, expected",
    [
        (16, 1, {}, 15),  # one H200 with 16 cores: all but the main process's core
        (128, 8, {}, 15),  # 8 ranks of a node share its cores
        (2, 1, {}, 1),  # never none
        (1, 4, {}, 1),
        (256, 1, {}, MAX_WORKERS),  # capped
        (128, 8, {"SLURM_CPUS_PER_TASK": "12", "SLURM_NTASKS": "16"}, 11),  # SLURM's share per task = rank
        (8, 1, {"SLURM_CPUS_PER_TASK": "12"}, 7),  # but no more than the affinity mask allows
        (64, 8, {"SLURM_CPUS_PER_TASK": "64", "SLURM_NTASKS": "1"}, 7),  # one task, 8 ranks: shared
        (16, 2, {"SLURM_CPUS_PER_TASK": ""}, 7),
    ],
)
def test_auto_num_workers(cpus, local_ranks, env, expected):
    assert auto_num_workers(local_ranks, cpus=cpus, env=env) == expected


def test_auto_num_workers_reads_this_process_affinity():
    assert 1 <= auto_num_workers(1, env={}) <= MAX_WORKERS


@pytest.mark.parametrize(
    "count, size",
    [(8, 1024), (8_000, 1024), (20_000, 1024), (2_000_000, 1954), (50_000_000, 10_000)],
)
def test_auto_shard_size(count, size):
    assert auto_shard_size(count) == size


def test_an_8000_image_folder_gives_workers_shards_to_share():
    """The old fixed 10,000 made one shard of 8,000 images: one decoding worker whatever was asked."""
    shards = chunk(8_000, "auto", "folder")
    assert len(shards) == 8 and shards[-1].stop == 8_000
    assert [s.start for s in shards] == list(range(0, 8_000, 1024))
    assert len(chunk(20_000, "auto", "folder")) == 20  # 16 workers of one H200 all busy


def test_auto_workers_fit_shared_memory():
    """A float32 batch of 1024 images at 224x224 is 616 MB; a container's 64 MB /dev/shm holds none."""
    from clip_fabric.data.sizing import cap_by_shared_memory

    batch = 1024 * 3 * 224 * 224 * 4
    assert cap_by_shared_memory(15, batch, free=64 << 20) == 1  # never none: the run still goes
    assert cap_by_shared_memory(15, batch, free=10 * batch) == 2  # half of it, two batches per worker
    assert cap_by_shared_memory(15, batch, local_ranks=2, free=16 * batch) == 2
    assert cap_by_shared_memory(15, batch, free=1 << 40) == 15
    assert cap_by_shared_memory(15, 0, free=0) == 15  # JPEG bytes for the GPU decoder: not counted
