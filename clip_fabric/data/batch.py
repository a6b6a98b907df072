"""A batch as it travels from a DataLoader worker to the encoder: the rows of one shard, their errors,
and the model inputs. Batches never straddle shards, so ``last`` tells the writer a shard is complete."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from clip_fabric.data.balance import WorkerTimes


@dataclass
class PackedJpegs:
    """JPEGs left for the device decoder: their bytes back to back, and the batch rows they fill."""

    data: Tensor
    lengths: Tensor
    rows: Tensor


@dataclass
class Batch:
    shard: int
    source: str
    rows: list[dict]
    """Metadata of each sample that reached the batch (key, caption, paths, ...), in input order."""
    errors: list[dict] = field(default_factory=list)
    """``key``, ``source``, ``reason`` of each sample of this stretch of the shard that was skipped."""
    last: bool = False
    images: Tensor | None = None
    """Decoded images: uint8 pixels, resized and cropped, from the ``cpu`` path (``to`` normalises them on
    the device), else the model's float32 input; with ``jpegs``, only of the rows in ``image_rows``."""
    image_rows: Tensor | None = None
    texts: Tensor | None = None
    jpegs: PackedJpegs | None = None
    part: int = 0
    """Which of the ``parts`` of its shard the batch belongs to: a shard is read by several workers where
    there are fewer shards than workers, and ``last`` then ends one part (``pipeline.in_shard_order``)."""
    parts: int = 1
    worker: WorkerTimes | None = None
    """On the ``gpu`` path, the worker's seconds for the batch (``balance.DecodeBalance``)."""

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread, so the copies to the GPU can be asynchronous."""
        pin = lambda t: t.pin_memory() if t is not None else None  # noqa: E731
        jpegs = self.jpegs and PackedJpegs(pin(self.jpegs.data), self.jpegs.lengths, self.jpegs.rows)
        return replace(self, images=pin(self.images), texts=pin(self.texts), jpegs=jpegs)

    def to(self, device: torch.device, normalise: Callable[[Tensor], Tensor] | None = None) -> Batch:
        """The model inputs on ``device``, copied without waiting (from pinned memory). Images that
        travel as uint8 pixels (the ``cpu`` decode path) become model input there through ``normalise``
        (``ImageSpec.normalise``)."""
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        images = move(self.images)
        if images is not None and images.dtype == torch.uint8:
            if normalise is None:
                raise ValueError("a batch of uint8 pixels needs its model's normalise to become model input")
            images = normalise(images)
        return replace(self, images=images, texts=move(self.texts))

    def drop(self, reasons: dict[int, str]) -> Batch:
        """The batch without the rows in ``reasons`` (row -> why), which become error records."""
        keep = [i for i in range(len(self.rows)) if i not in reasons]
        index = torch.tensor(keep, dtype=torch.int64)
        take = lambda t: t[index.to(t.device)] if t is not None else None  # noqa: E731
        errors = self.errors + [
            {"key": self.rows[i]["key"], "source": self.source, "reason": why}
            | ({"image_path": self.rows[i]["image_path"]} if self.rows[i].get("image_path") else {})
            for i, why in sorted(reasons.items())
        ]
        return replace(
            self,
            rows=[self.rows[i] for i in keep],
            errors=errors,
            images=take(self.images),
            texts=take(self.texts),
        )
