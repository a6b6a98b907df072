"""Encoding batches on the device: in order, one batch in flight while the next is queued, and without
losing a batch to an out-of-memory error.

A batch that does not fit is split in halves and retried, and the size that fitted becomes the most
this run sends at once from then on, so one oversized batch costs one retry, not the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from clip_fabric.data.batch import Batch

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from torch import nn

log = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class ChunkedEmbedder:
    """Calls ``encode(images, texts) -> {tower: embeddings}`` on chunks of at most ``max_batch`` rows."""

    def __init__(
        self, encode: Callable[..., dict[str, Tensor]], max_batch: int, retries_oom: bool = True
    ) -> None:
        self.encode = encode
        self.module = encode  # the set-up module, for strategies that need it
        self.max_batch = max_batch
        self.retries_oom = retries_oom  # False where ranks compute a batch together (tensor_parallel)

    def __call__(self, images: Tensor | None, texts: Tensor | None) -> dict[str, Tensor]:
        rows = len(images if images is not None else texts)
        start, parts = 0, []
        while start < rows:
            stop = min(start + self.max_batch, rows)
            try:
                parts.append(
                    self.encode(*(x[start:stop] if x is not None else None for x in (images, texts)))
                )
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err) or stop - start == 1 or not self.retries_oom:
                    raise
                self.max_batch = max((stop - start) // 2, 1)
                log.warning(
                    "out of memory on %d rows: retrying in chunks of %d", stop - start, self.max_batch
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return {tower: torch.cat([p[tower] for p in parts]) for tower in parts[0]}


DEFAULT_BATCH_SIZE = 256


def auto_batch_size(
    encode: Callable[..., object],
    inputs: Callable[[int], tuple],
    devices: torch.device | list[torch.device],
    limit: int = 1024,
    probe: int = 16,
    headroom: float = 0.7,
    extra_bytes_per_sample: int = 0,
) -> int:
    """The largest power of two up to ``limit`` whose batch fits in ``headroom`` of the memory still free
    on every one of ``devices``, from the peak memory of one probe batch of ``probe`` samples;
    ``DEFAULT_BATCH_SIZE`` where they are not GPUs. ``extra_bytes_per_sample`` reserves room on the first
    device for other per-sample buffers (batches in flight, GPU decoding)."""
    devices = [devices] if isinstance(devices, torch.device) else list(devices)
    if devices[0].type != "cuda":
        return DEFAULT_BATCH_SIZE
    before = {}
    for device in devices:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before[device] = torch.cuda.memory_allocated(device)
    encode(*inputs(probe))
    sizes = []
    for i, device in enumerate(devices):
        torch.cuda.synchronize(device)
        per_sample = (torch.cuda.max_memory_allocated(device) - before[device]) / probe
        per_sample += extra_bytes_per_sample if i == 0 else 0
        free, _ = torch.cuda.mem_get_info(device)
        # Memory the caching allocator holds but does not use is free to this process too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        fits = int(headroom * free / max(per_sample, 1))
        sizes.append(1 << max(fits, 1).bit_length() - 1)
        log.info("auto batch size on %s: %d (%.1f MB per sample, %.1f GB free)", device, sizes[-1],
                 per_sample / 1e6, free / 1e9)  # fmt: skip
    return max(1, min(*sizes, limit))


def choose_batch_size(
    fabric: Fabric,
    module: nn.Module,
    model: nn.Module,
    batch_size: int | str,
    towers: frozenset[str],
    extra_bytes_per_sample: int = 0,
) -> int:
    """``batch_size`` (``--data.batch_size``), or what ``auto`` finds with one probe batch of the
    ``towers`` that run on every device holding weights, the smallest over all ranks. A strategy whose
    forward needs a partner rank (``local_forward = False``) cannot probe alone and gets the default.
    ``extra_bytes_per_sample``: device memory kept free per sample besides the model's (the decode
    path's, ``DecodePath.device_bytes_per_sample``)."""
    from torch.distributed import ReduceOp

    from clip_fabric.strategies import hooks

    if batch_size != "auto":
        return int(batch_size)
    if not hooks(fabric.strategy).local_forward:
        fabric.print(f"clip_fabric: batch size {DEFAULT_BATCH_SIZE} (auto cannot probe a paired forward)")
        return DEFAULT_BATCH_SIZE
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    held = {p.device for p in model.parameters() if p.device.type == fabric.device.type}
    devices = [fabric.device, *sorted(held - {fabric.device}, key=str)]  # two under model_parallel

    def inputs(n: int) -> tuple:
        return (
            torch.zeros(n, 3, size, size, device=devices[0]) if "image" in towers else None,
            torch.zeros(n, model.context_length, dtype=torch.int64, device=devices[0])
            if "text" in towers
            else None,
        )

    with torch.inference_mode():
        found = auto_batch_size(module, inputs, devices, extra_bytes_per_sample=extra_bytes_per_sample)
    found = int(fabric.all_reduce(torch.tensor(found, device=fabric.device), reduce_op=ReduceOp.MIN))
    fabric.print(f"clip_fabric: batch size {found} (auto)")
    return found


class InFlight:
    """A batch whose results are on their way to pinned host memory."""

    def __init__(self, batch: Batch, embed: Callable[..., dict[str, Tensor]]) -> None:
        self.batch, self.started = batch, time.perf_counter()
        outputs = embed(batch.images, batch.texts) if batch.rows else {}
        self.outputs = {k: v.to("cpu", non_blocking=True) for k, v in outputs.items()}
        # Each copy runs on its own device's stream (model_parallel's towers sit on two GPUs).
        self.events = []
        for device in {v.device for v in outputs.values() if v.device.type == "cuda"}:
            with torch.cuda.device(device):
                self.events.append(torch.cuda.Event())
                self.events[-1].record()

    def result(self) -> tuple[Batch, dict[str, np.ndarray], float]:
        """The batch, its outputs as arrays, and the seconds from its start to its results."""
        for event in self.events:
            event.synchronize()
        return self.batch, {k: v.numpy() for k, v in self.outputs.items()}, time.perf_counter() - self.started


def encode_in_order(
    batches: Iterable[Batch],
    embed: Callable[..., dict[str, Tensor]],
    stopping: Callable[[], bool],
    open_shards: Callable[[], set[int]],
) -> Iterator[tuple[Batch, dict[str, np.ndarray], float]]:
    """``(batch, outputs, latency)`` of each batch in order. A batch's results copy back while the next
    batch is queued on the device. Once ``stopping()`` (asked before every batch), the shards already
    begun (``open_shards()``, as the caller has written so far) are finished and no new one is begun, so
    a stopped run leaves whole shards for the rerun."""
    pending: InFlight | None = None
    for batch in batches:
        if stopping():
            if pending is not None:
                yield pending.result()
                pending = None
            if batch.shard not in open_shards():
                if not open_shards():
                    return
                continue
        pending, previous = InFlight(batch, embed), pending
        if previous is not None:
            yield previous.result()
    if pending is not None:
        yield pending.result()
