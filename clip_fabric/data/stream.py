"""Turns a rank's shards into batches that never straddle two shards, in DataLoader workers.

Each worker takes every n-th shard of the rank, reads and decodes its samples in order, and ends each
shard with a batch marked ``last``, so the writer knows when a shard's rows are all in. A sample that
cannot be read or decoded becomes an error record in its batch instead of an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clip_fabric.data import RawSample, Shard, Source
from clip_fabric.data.decode import CpuDecoder

Batch = dict[str, Any]


class ShardStream(IterableDataset):
    def __init__(
        self,
        source: Source,
        shards: list[Shard],
        decoder: CpuDecoder,
        batch_size: int,
        need_image: bool,
        need_text: bool,
    ) -> None:
        self.source = source
        self.shards = shards
        self.decoder = decoder
        self.batch_size = batch_size
        self.need_image = need_image
        self.need_text = need_text

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        shards = self.shards[info.id :: info.num_workers] if info is not None else self.shards
        for shard in shards:
            yield from self._batches(shard)

    def _batches(self, shard: Shard) -> Iterator[Batch]:
        rows, images, captions, errors = [], [], [], []
        for raw in self.source.samples(shard):
            image, reason = self._decode(raw)
            if reason is not None:
                errors.append({"key": raw.key, "source": shard.name, "reason": reason})
                continue
            rows.append({"key": raw.key, **raw.meta, "caption": raw.caption})
            if image is not None:
                images.append(image)
            if self.need_text:
                captions.append(raw.caption)
            if len(rows) == self.batch_size:
                yield self._batch(shard, rows, images, captions, errors, last=False)
                rows, images, captions, errors = [], [], [], []
        yield self._batch(shard, rows, images, captions, errors, last=True)

    def _decode(self, raw: RawSample) -> tuple[torch.Tensor | None, str | None]:
        if raw.error is not None:
            return None, raw.error
        if self.need_text and not (raw.caption and raw.caption.strip()):
            return None, "no caption"
        if not self.need_image:
            return None, None
        try:
            return self.decoder.image(raw.image), None
        except Exception as err:  # noqa: BLE001 - whatever a broken file raises, the job goes on
            return None, f"undecodable image: {type(err).__name__}: {err}"

    def _batch(
        self, shard: Shard, rows: list, images: list, captions: list, errors: list, last: bool
    ) -> Batch:
        return {
            "shard": shard.index,
            "rows": rows,
            "images": torch.stack(images) if images else None,
            "texts": self.decoder.texts(captions) if captions else None,
            "errors": errors,
            "last": last,
        }
