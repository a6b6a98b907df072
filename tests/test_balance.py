"""The share of JPEGs the workers decode beside the GPU decoder (``data/balance.py``)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch.utils.data import DataLoader

from clip_fabric.data import RawSample, Shard
from clip_fabric.data.balance import MOST, START, DecodeBalance, ShareCounter, WorkerTimes, balanced_share
from clip_fabric.data.decode import CpuDecoder
from clip_fabric.data.stream import ShardStream
from tests.test_throughput import PREPROCESS, ListSource, encoded


def test_the_share_evens_the_main_process_and_the_workers():
    # Main: 10 us a row + 100 us a GPU JPEG; 10 workers: 50 us a row + 2 ms a decoded JPEG.
    share = balanced_share(m=10e-6, g=100e-6, b=50e-6, c=2e-3, workers=10)
    main, workers = 10e-6 + (1 - share) * 100e-6, (50e-6 + share * 2e-3) / 10
    assert 0 < share < MOST and main == pytest.approx(workers)
    assert balanced_share(m=0, g=1e-6, b=1e-3, c=1e-3, workers=4) == 0.0  # the workers are the bound already
    assert balanced_share(m=1e-3, g=1e-3, b=0, c=1e-6, workers=4) == MOST  # never all of them


def test_the_counter_spreads_any_share_evenly():
    counter = ShareCounter()
    assert [counter.on_cpu(0.25) for _ in range(8)] == [False, False, False, True] * 2
    counter = ShareCounter()
    assert sum(counter.on_cpu(0.1) for _ in range(100)) == 10
    assert not any(ShareCounter().on_cpu(0.0) for _ in range(100))
    counter = ShareCounter()
    assert all(counter.on_cpu(1.0) for _ in range(10))


def test_auto_moves_the_share_to_where_both_sides_take_as_long():
    balance = DecodeBalance("auto", workers=8)
    assert balance.share == START
    m, g, b, c = 20e-6, 150e-6, 40e-6, 3e-3
    for _ in range(60):  # batches of 512 whose times follow the costs above at the share they were made
        s, rows = balance.share, 512
        decoded = round(s * rows)
        worker = WorkerTimes(decode_s=decoded * c, decoded=decoded, other_s=rows * b, rows=rows)
        balance.observe(worker, stage_s=(rows - decoded) * g, gpu_jpegs=rows - decoded, main_s=rows * m)
    assert balance.share == pytest.approx(balanced_share(m, g, b, c, 8), abs=0.01)
    assert balance.cpu_fraction() == pytest.approx(balance.share, abs=0.05)
    fixed = DecodeBalance(0.3, workers=8)
    fixed.observe(WorkerTimes(1.0, 3, 1.0, 10), stage_s=1.0, gpu_jpegs=7, main_s=1.0)
    assert fixed.share == 0.3 and fixed.cpu_fraction() == 0.3


def test_workers_read_a_new_share_while_they_run():
    """The DataLoader's workers see the main process's estimate in shared memory, batch after batch."""
    samples = [RawSample(f"k{i}", encoded((48, 40)), f"c{i}") for i in range(64)]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"))
    balance = DecodeBalance("auto", workers=1)
    balance._share.value = 0.0
    stream = ShardStream(ListSource(samples), [Shard(0, "list")], cpu, 8, True, True, True, balance=balance)
    loader = DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=1)
    got = []
    for batch in loader:
        if batch.rows:  # the shard's closing batch may be empty
            got.append(batch.worker.decoded)
        balance._share.value = 1.0  # a batch begun after this decodes every JPEG on the CPU
    # The first batch all on the GPU path; the worker may have begun the second already; the rest on the CPU.
    assert got[0] == 0 and got[2:] == [8] * 6, got


def test_worker_times_travel_with_the_batch_and_count_every_row():
    samples = [RawSample(f"k{i}", encoded((48, 40)), f"c{i}") for i in range(20)]
    samples.append(RawSample("png", encoded((48, 40), fmt="PNG"), "c"))  # decoded by the worker anyway
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"))
    stream = ShardStream(
        ListSource(samples), [Shard(0, "list")], cpu, 16, True, True, True, balance=DecodeBalance(0.5, 1)
    )
    first, second = list(stream)
    assert (first.worker.rows, second.worker.rows) == (16, 5)
    assert first.worker.decoded + second.worker.decoded == 11  # 10 of 20 JPEGs and the PNG
    assert all(t.decode_s > 0 and t.other_s >= 0 for t in (first.worker, second.worker))
    assert torch.is_tensor(first.images) and first.jpegs is not None


def test_predicts_pipeline_tunes_the_share_and_keeps_every_row():
    """``device_batches`` on the ``gpu`` path (its device stage runs on the CPU here) with ``auto``: every
    row once, in order, and the share set from the measured times of both sides."""
    from clip_fabric.config import DataArgs
    from clip_fabric.data.paths import PATHS
    from clip_fabric.data.pipeline import device_batches
    from clip_fabric.modes import MODES

    samples = [RawSample(f"{i:03d}", encoded((40 + i % 7 * 9, 48 - i % 5 * 3)), "c") for i in range(96)]
    source = ListSource(samples)
    data = DataArgs(format="synthetic", num_workers=2, batch_size=8)
    assert data.cpu_decode_share == "auto"
    batches = device_batches(source, source.shards(), PREPROCESS, open_clip.get_tokenizer("ViT-B-32"), data,
                             8, torch.device("cpu"), PATHS["gpu"], MODES["image"])  # fmt: skip
    out = list(batches)
    assert [r["key"] for b in out for r in b.rows] == [f"{i:03d}" for i in range(96)]
    assert all(b.images.shape[1:] == (3, 224, 224) for b in out if b.rows)
    balance = batches.balance
    assert balance.auto and balance.jpeg_rows == 96
    assert 0 < balance.cpu_fraction() <= MOST and balance.share != START
