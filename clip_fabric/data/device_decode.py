"""The device stage of the image path: JPEG bytes to model inputs in batches, on the GPU.

A batch's JPEGs are decoded together (nvJPEG through torchvision), images of one size are resized
together (bicubic, antialiased: torch's match of PIL's filter), center-cropped and normalised as
open_clip's preprocess does, and placed among the rows the workers already decoded on the CPU.

A JPEG the batched decode rejects is retried alone, then on the CPU; one that fails there too leaves
its batch as an error record. The stage runs on any device (the tests run it on the CPU).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from dataclasses import replace

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from clip_fabric.data.batch import Batch
from clip_fabric.data.decode import CpuDecoder, ImageSpec

log = logging.getLogger(__name__)
# Resize at most this many input pixels x channels at once (float32: 4 bytes each), so a batch of large
# photos of one size is resized in chunks rather than all at once.
RESIZE_CHUNK_VALUES = 64 * 1024 * 1024


def gpu_decode_available(device: torch.device) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` (a CUDA build with nvJPEG)."""
    if device.type != "cuda":
        return False
    try:
        from clip_fabric.data.synthetic import synthetic_jpeg

        data = torch.frombuffer(bytearray(synthetic_jpeg(0, (16, 16))), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_jpeg([data], device=device)
        return True
    except (RuntimeError, NotImplementedError) as err:
        log.warning("GPU JPEG decode unavailable on %s (%s): decoding on the CPU", device, err)
        return False


class DeviceImageDecoder:
    """Completes a batch's ``images`` on ``device`` from its packed JPEG bytes."""

    def __init__(self, spec: ImageSpec, cpu: CpuDecoder, device: torch.device) -> None:
        self.spec = spec
        self.cpu = cpu
        self.device = torch.device(device)
        # nvJPEG's outputs are allocated from the memory pool of the stream current during the decode,
        # and written on torchvision's own stream. Blocks the encoder's stream freed while its kernels
        # are still queued can be handed out again at once on that same stream, so decoding straight
        # into the encoder stream's pool overwrote activations of the batch still running (2-GPU H100
        # runs wrote image rows that differed between runs, cosine down to 0.91). A stream that runs
        # no kernels owns the decoded images instead, and each image is marked as used on the stream
        # that resizes it, so its memory comes back only once that resize has run.
        self.pool = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, batch: Batch) -> Batch:
        """``batch`` with ``images`` on the device for all its rows; rows whose JPEG no decoder reads move
        to ``errors``. Queues work on the device without waiting for it (no host synchronisation beyond
        nvJPEG's own), so the batch before this one keeps the GPU busy meanwhile. Takes a worker's batch
        (uint8 pixels are normalised on the device) or one already there."""
        batch = batch.to(self.device, self.spec.normalise)
        if batch.jpegs is None:
            return batch
        blobs = list(torch.split(batch.jpegs.data, batch.jpegs.lengths.tolist()))
        decoded, failed = self._decode(blobs)
        jpeg_rows = batch.jpegs.rows.tolist()
        done = [i for i in range(len(blobs)) if i not in failed]
        resized = self._resize([decoded[i] for i in done]) if done else None
        if batch.images is None and not failed:
            images = resized  # every row a JPEG, in order: no scatter
        else:
            images = torch.empty(len(batch.rows), 3, *self.spec.crop, device=self.device)
            if batch.images is not None:
                images[self._index(batch.image_rows)] = batch.images
            if done:
                images[self._index([jpeg_rows[i] for i in done])] = resized
        out = replace(batch, images=images, image_rows=None, jpegs=None)
        return out.drop({jpeg_rows[i]: reason for i, reason in failed.items()}) if failed else out

    def _index(self, rows: list[int] | Tensor) -> Tensor:
        """Row positions on the device, copied without making the host wait for the device."""
        index = torch.as_tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda" and not index.is_pinned():
            index = index.pin_memory()
        return index.to(self.device, non_blocking=True)

    def _decode(self, blobs: list[Tensor]) -> tuple[dict[int, Tensor], dict[int, str]]:
        """Decoded CHW uint8 images by position, and the reasons of those that failed everywhere."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for its decoders
            try:
                return dict(enumerate(self._nvjpeg(blobs))), {}
            except RuntimeError as err:
                log.warning("batched JPEG decode failed (%s): decoding the batch one image at a time", err)
            decoded, failed = {}, {}
            for i, blob in enumerate(blobs):
                try:
                    decoded[i] = self._nvjpeg([blob])[0]
                except RuntimeError:
                    try:  # the CPU decoder tolerates some files nvJPEG refuses
                        decoded[i] = self.cpu.image(blob.numpy().tobytes())
                    except Exception as err:  # noqa: BLE001 - a broken file is a record, not a crash
                        failed[i] = f"undecodable image: {type(err).__name__}: {err}"
        return decoded, failed

    def _nvjpeg(self, blobs: list[Tensor]) -> list[Tensor]:
        """nvJPEG's batched decode. It returns once the images are written (torchvision waits for its
        stream), so the host bytes are free again; the images belong to ``self.pool`` (see __init__)."""
        if self.pool is None:
            return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.pool):
            images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
        consumer.wait_stream(self.pool)
        for image in images:
            image.record_stream(consumer)
        return images

    def _resize(self, images: list[Tensor]) -> Tensor:
        """Preprocessed images in the order given: same-size images resized together."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[tuple(image.shape) if image.dtype == torch.uint8 else ("cpu",)].append(i)
        if len(groups) == 1 and ("cpu",) not in groups:
            return self._resize_group(images)  # one size (a typical batch): no scatter
        out = torch.empty(len(images), 3, *self.spec.crop, device=self.device)
        for shape, members in groups.items():
            part = [images[i] for i in members]
            if shape == ("cpu",):  # fell back to the CPU decoder: already preprocessed
                out[self._index(members)] = torch.stack(part).to(self.device)
            else:
                out[self._index(members)] = self._resize_group(part)
        return out

    def _resize_group(self, images: list[Tensor]) -> Tensor:
        """``images`` of one size, preprocessed in chunks of at most RESIZE_CHUNK_VALUES input values."""
        channels, height, width = images[0].shape
        step = max(1, RESIZE_CHUNK_VALUES // (channels * height * width))
        if step >= len(images):
            return self.spec.apply(torch.stack(images))
        out = torch.empty(len(images), 3, *self.spec.crop, device=self.device)
        for start in range(0, len(images), step):
            out[start : start + step] = self.spec.apply(torch.stack(images[start : start + step]))
        return out
