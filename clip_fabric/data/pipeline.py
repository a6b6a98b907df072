"""A rank's batches, from its shards to tensors on its device: the one place that assembles
source -> decode (DataLoader workers) -> batch -> device (and GPU decode), for predict and evaluate.

The hop to the device runs in line, in the main thread. The overlap comes from the order of work in the
predict loop: the batch after this one is read and decoded here while the GPU still runs this batch's
encoder (kernel launches return at once, and the loop waits for a batch's results one batch later).
A background thread with its own CUDA stream was tried first and hung at scale on an H100 (40k images,
15 workers, batches of 1,000), so the simpler order is kept."""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from clip_fabric.config import DataArgs
from clip_fabric.data import Shard, Source
from clip_fabric.data.balance import MOST, DecodeBalance
from clip_fabric.data.batch import Batch
from clip_fabric.data.decode import CpuDecoder
from clip_fabric.data.device_decode import DeviceImageDecoder
from clip_fabric.data.paths import DecodePath
from clip_fabric.data.sizing import resolve_num_workers
from clip_fabric.data.stream import ShardStream
from clip_fabric.modes import Mode
from clip_fabric.preemption import watch_workers, worker_shield

log = logging.getLogger(__name__)
MIN_PART = 64  # fewest samples in one part of a shard that several workers read
# Only shards of at most this many samples are split (auto's largest): the later parts of a split shard wait
# in memory for its first, so a huge --data.shard_size is read as it is.
SPLIT_AT_MOST = 10_000


class DeviceBatches:
    """Batches of ``shards`` with ``images``/``texts`` on ``device`` as ``mode`` needs them, in shard order;
    ``decode`` as resolved; ``local_ranks`` share the node's CPUs for ``--data.num_workers auto``. What it
    settled on is kept for the summary: ``workers`` and, on the GPU path, ``jpeg_library``."""

    def __init__(
        self,
        source: Source,
        shards: list[Shard],
        preprocess: Callable,
        tokenizer: Callable,
        data: DataArgs,
        batch_size: int,
        device: torch.device,
        decode: DecodePath,
        mode: Mode,
        local_ranks: int = 1,
    ) -> None:
        # DCT scaling only where asked for, and never beside the GPU decoder (both keep 1e-5 without it).
        # The cpu path hands uint8 pixels to a GPU, which normalises them in microseconds; a CPU run keeps
        # that step in the workers, beside the decoding, rather than in its one main process.
        cpu = CpuDecoder(
            preprocess, tokenizer, data.max_image_pixels, mode=decode.worker_mode,
            scale_jpegs=data.dct_scaling and decode.scales_jpegs, normalise_on_device=device.type != "cpu",
        )  # fmt: skip
        gpu = decode.on_device and mode.reads_images
        # Decoded images cross from the workers through shared memory, which caps --data.num_workers
        # auto: uint8 pixels on the cpu path for a GPU (3 bytes a pixel), float32 model input otherwise
        # (12); JPEG bytes for the GPU decoder are small.
        # (12); JPEG bytes for the GPU decoder are small, beside the share the workers decode.
        pixels = batch_size * cpu.spec.crop[0] * cpu.spec.crop[1] if cpu.spec and mode.reads_images else 0
        share = data.cpu_decode_share
        batch_bytes = (
            int(3 * pixels * (MOST if share == "auto" else share))
            if gpu
            else (3 if cpu.normalise_on_device and cpu.mode == "cpu" else 12) * pixels
        )
        wanted = resolve_num_workers(data.num_workers, local_ranks, batch_bytes)
        pieces = split_shards(shards, wanted)
        self.workers = min(wanted, len(pieces))
        self.balance = DecodeBalance(share, self.workers) if gpu else None
        stream = ShardStream(
            source, pieces, cpu, batch_size, mode.reads_images, mode.caption_required, gpu_jpeg=gpu,
            balance=self.balance,
        )  # fmt: skip
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=worker_shield(),
        )
        self.stage = DeviceImageDecoder(cpu.spec, cpu, device) if gpu else None
        self.jpeg_library = self.stage.library if self.stage is not None else None
        self.device, self.normalise = device, cpu.spec.normalise if cpu.spec is not None else None

    def __iter__(self) -> Iterator[Batch]:
        # The loader's iterator is kept here past an error: shutting it down reaps its workers, and the
        # caller then could no longer tell which one died (``preemption.dead_workers``).
        self.loader_iter = iter(self.loader)
        watch_workers(getattr(self.loader_iter, "_workers", []))
        batches = in_shard_order(self.loader_iter)
        try:
            if self.stage is None:
                for batch in batches:
                    yield batch.to(self.device, self.normalise)
            else:
                for batch in batches:
                    started = time.perf_counter()
                    out = self.stage(batch)
                    staged = time.perf_counter()
                    yield out
                    jpegs = len(batch.jpegs.lengths) if batch.jpegs is not None else 0
                    self.balance.observe(batch.worker, staged - started, jpegs, time.perf_counter() - staged)
        except GeneratorExit:
            self.loader_iter = None
            raise
        self.loader_iter = None


device_batches = DeviceBatches


def split_shards(shards: list[Shard], workers: int) -> list[Shard | tuple[Shard, int, int]]:
    """The pieces the workers read: the shards themselves where there are at least as many as workers
    (or their length is not known before reading, as a tar's, or it is over SPLIT_AT_MOST), else each
    shard cut into parts of at least MIN_PART samples, ``(part, index, count)``, so that a small input
    keeps every worker busy."""
    if len(shards) >= workers or not shards or any(not 0 < s.stop - s.start <= SPLIT_AT_MOST for s in shards):
        return list(shards)
    pieces: list[Shard | tuple[Shard, int, int]] = []
    for shard in shards:
        size = shard.stop - shard.start
        parts = max(1, min(-(-workers // len(shards)), size // MIN_PART))
        bounds = [shard.start + size * p // parts for p in range(parts + 1)]
        pieces += [(replace(shard, start=bounds[p], stop=bounds[p + 1]), p, parts) for p in range(parts)]
    return pieces if len(pieces) > len(shards) else list(shards)


def in_shard_order(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Batches as one worker reading each whole shard would give them: the parts of a shard, read by
    several workers at once, one after the other, and ``last`` only on the shard's last batch. Batches of
    a part that is not next wait here (a small input's, at most the shard's later parts)."""
    waiting: dict[tuple[int, int], deque[Batch]] = defaultdict(deque)
    current: dict[int, int] = {}
    for batch in batches:
        if batch.parts == 1:
            yield batch
            continue
        waiting[batch.shard, batch.part].append(batch)
        part = current.get(batch.shard, 0)
        while waiting.get((batch.shard, part)):
            out = waiting[batch.shard, part].popleft()
            if out.last:
                del waiting[batch.shard, part]
                part += 1
            yield replace(out, last=out.last and part == out.parts, part=0, parts=1)
        current[batch.shard] = part
