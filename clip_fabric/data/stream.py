"""Turns a rank's shards into batches that never straddle two shards, in DataLoader workers.

Each worker takes every n-th piece of the rank's shards (a whole shard, or one of the ``parts`` of a
shard where there are fewer shards than workers), reads and decodes its samples in order, and ends each
piece with a batch marked ``last``, so the writer knows when a shard's rows are all in. A sample that
cannot be read or decoded becomes an error record in its batch instead of an exception.

For a GPU, decoded images travel as uint8 pixels where the ``cpu`` path decoded them all
(``CpuDecoder.decode``); the device normalises them (``Batch.to``).

With ``gpu_jpeg`` the JPEGs the GPU decoder takes are checked (header, size) but not decoded: their bytes
travel packed in one tensor (``Batch.jpegs``), and ``image_rows``/``jpegs.rows`` say which
rows of the batch each image tensor belongs to; ``clip_fabric.data.device_decode`` decodes them on the device.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clip_fabric.data import RawSample, Shard, Source
from clip_fabric.data.balance import DecodeBalance, ShareCounter, WorkerTimes
from clip_fabric.data.batch import Batch, PackedJpegs
from clip_fabric.data.decode import CpuDecoder, jpeg_header, pack_bytes, undecodable

GPU_JPEG_MODES = ("RGB", "L")


class ShardStream(IterableDataset):
    def __init__(
        self,
        source: Source,
        shards: list[Shard | tuple[Shard, int, int]],
        decoder: CpuDecoder,
        batch_size: int,
        need_image: bool,
        need_caption: bool,
        gpu_jpeg: bool = False,
        balance: DecodeBalance | None = None,
    ) -> None:
        self.source = source
        self.shards = shards
        self.decoder = decoder
        self.batch_size = batch_size
        self.need_image = need_image
        self.need_caption = need_caption  # the text tower runs: a sample without a caption is an error
        self.gpu_jpeg = gpu_jpeg
        self.balance = balance  # with gpu_jpeg: the share of JPEGs decoded here anyway, and the times

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        pieces = self.shards[info.id :: info.num_workers] if info is not None else self.shards
        for piece in pieces:
            shard, part, parts = piece if isinstance(piece, tuple) else (piece, 0, 1)
            for batch in self._batches(shard):
                batch.part, batch.parts = part, parts
                yield batch

    def _batches(self, shard: Shard) -> Iterator[Batch]:
        rows, images, captions, errors = [], [], [], []
        # The share's JPEGs are spread evenly from each shard's start: a fixed share decodes the same
        # ones on the CPU on every run.
        counter, times, clock = ShareCounter(), WorkerTimes(), time.perf_counter()
        for raw in self.source.samples(shard):
            on_gpu = self.gpu_jpeg and not (self.balance and counter.on_cpu(self.balance.share))
            started = time.perf_counter()
            image, reason = self._decode(raw, on_gpu)
            if self.gpu_jpeg and isinstance(image, torch.Tensor):
                times.decode_s += time.perf_counter() - started
                times.decoded += 1
            if reason is not None:
                where = {"image_path": raw.meta["image_path"]} if raw.meta.get("image_path") else {}
                errors.append({"key": raw.key, "source": shard.name, "reason": reason} | where)
                continue
            rows.append({"key": raw.key, **raw.meta, "caption": raw.caption})
            images.append(image)
            if self.need_caption:
                captions.append(raw.caption)
            if len(rows) == self.batch_size:
                batch = self._batch(shard, rows, images, captions, errors, last=False)
                yield self._timed(batch, times, clock)
                rows, images, captions, errors = [], [], [], []
                times, clock = WorkerTimes(), time.perf_counter()
        yield self._timed(self._batch(shard, rows, images, captions, errors, last=True), times, clock)

    def _timed(self, batch: Batch, times: WorkerTimes, clock: float) -> Batch:
        """``batch`` with this worker's seconds for it, on the GPU path (``DecodeBalance``)."""
        if self.gpu_jpeg:
            times.other_s, times.rows = time.perf_counter() - clock - times.decode_s, len(batch.rows)
            batch.worker = times
        return batch

    def _decode(self, raw: RawSample, on_gpu: bool) -> tuple[torch.Tensor | bytes | None, str | None]:
        """The image tensor (or, for the GPU decoder, the checked JPEG bytes), or why there is none."""
        if raw.error is not None:
            return None, raw.error
        if self.need_caption and not (raw.caption and raw.caption.strip()):
            return None, raw.caption_error or "no caption"
        if not self.need_image:
            return None, None
        try:
            if on_gpu:
                header = jpeg_header(raw.image)
                if header is not None and header.mode in GPU_JPEG_MODES and not header.progressive:
                    self.decoder.check_pixels(header.width, header.height)
                    return raw.image, None
            return self.decoder.decode(raw.image), None
        except Exception as err:  # noqa: BLE001 - whatever a broken file raises, the job goes on
            return None, undecodable(err)

    def _batch(
        self, shard: Shard, rows: list, images: list, captions: list, errors: list, last: bool
    ) -> Batch:
        texts = self.decoder.texts(captions) if captions else None
        batch = Batch(shard.index, shard.name, rows, errors, last, texts=texts)
        if not self.need_image or not images:
            return batch
        tensors = [i for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
        stacked = self._stack([images[i] for i in tensors]) if tensors else None
        if len(tensors) == len(images):
            batch.images = stacked
            return batch
        jpegs = [i for i, image in enumerate(images) if not isinstance(image, torch.Tensor)]
        data, lengths = pack_bytes([images[i] for i in jpegs])
        batch.images = stacked
        batch.image_rows = torch.tensor(tensors, dtype=torch.int64)
        batch.jpegs = PackedJpegs(data, lengths, torch.tensor(jpegs, dtype=torch.int64))
        return batch

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One tensor of the batch's decoded images: uint8 pixels where all are (the device normalises
        them), else all as model input, for the rare batch where open_clip's own preprocess took some
        (palette, alpha, CMYK images)."""
        if len({image.dtype for image in images}) > 1:
            normalise = self.decoder.spec.normalise
            images = [normalise(i[None])[0] if i.dtype == torch.uint8 else i for i in images]
        return torch.stack(images)
