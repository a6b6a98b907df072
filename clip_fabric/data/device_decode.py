"""The device stage of the image path: JPEG bytes to model inputs in batches, on the GPU.

A batch's JPEGs are decoded together by one of two libraries, chosen once per run (``jpeg_library``):

- ``nvimgcodec`` (NVIDIA nvImageCodec, ``pip install 'clip_fabric[gpu-jpeg]'``): the GPU's hardware JPEG
  engines (A100, H100, H200) where present, its CUDA decoder for what they refuse, then its CPU one. The
  engines are not the GPU's multiprocessors, so they decode the next batch while the tower runs.
- ``torchvision`` (nvJPEG on the multiprocessors): always there with a CUDA build of torchvision.

Images of one size are then resized together (bicubic, antialiased: torch's match of PIL's filter),
center-cropped and normalised as open_clip's preprocess does, and placed among the rows the workers
already decoded on the CPU.

A JPEG the batched decode rejects is retried alone, then on the CPU; one that fails there too leaves
its batch as an error record. The stage runs on any device (the tests run it on the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from clip_fabric.data.batch import Batch
from clip_fabric.data.decode import CpuDecoder, ImageSpec

log = logging.getLogger(__name__)
# Resize at most this many input pixels x channels at once (float32: 4 bytes each), so a batch of large
# photos of one size is resized in chunks rather than all at once.
RESIZE_CHUNK_VALUES = 64 * 1024 * 1024
# Share of a batch nvImageCodec gives the hardware engines first; the CUDA decoder takes the rest and
# whatever the engines cannot decode (progressive files, unusual subsamplings).
HW_LOAD_HINT = 0.9
JPEG_LIBRARIES = ("nvimgcodec", "torchvision")


def gpu_decode_available(device: torch.device) -> bool:
    """Whether JPEGs can be decoded on ``device`` (a CUDA device, with nvImageCodec or a torchvision
    built with nvJPEG)."""
    if device.type != "cuda":
        return False
    library = jpeg_library(device)
    if library is None:
        log.warning("GPU JPEG decode unavailable on %s: decoding on the CPU", device)
    return library is not None


@functools.cache
def _library_for(device_type: str, index: int | None) -> str | None:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    from clip_fabric.data.synthetic import synthetic_jpeg

    probe = synthetic_jpeg(0, (16, 16))
    for name in JPEG_LIBRARIES:
        try:
            if _DECODERS[name](device).decodes_on_device(np.frombuffer(probe, dtype=np.uint8)):
                return name
            log.debug("%s did not decode a JPEG on %s", name, device)
        except Exception as err:  # noqa: BLE001 - not installed, no nvJPEG, no driver: try the next one
            log.debug("%s cannot decode JPEGs on %s: %s", name, device, err)
    return None


def jpeg_library(device: torch.device) -> str | None:
    """The JPEG library the GPU path uses on ``device``: nvImageCodec where it is installed and works,
    else torchvision's nvJPEG, else None (one log line says which, once per process)."""
    device = torch.device(device)
    name = _library_for(device.type, device.index)
    if name == "torchvision" and device.type == "cuda" and not _said_fallback:
        _said_fallback.append(True)
        log.info("nvImageCodec is not installed (pip install 'clip_fabric[gpu-jpeg]'): JPEGs are decoded "
                 "by torchvision's nvJPEG on the multiprocessors, not the hardware JPEG engines")  # fmt: skip
    return name


_said_fallback: list[bool] = []


class NvImageCodecJpegs:
    """Batched decode through nvImageCodec: hardware engines, then CUDA, then CPU on a GPU; CPU only on
    the CPU (the tests). Decoded images stay in nvImageCodec's memory, reused batch after batch."""

    def __init__(self, device: torch.device) -> None:
        with _quiet_stderr():  # loading the JPEG 2000 and TIFF extensions complains of missing libraries
            from nvidia import nvimgcodec as nv

        self.nv, self.device = nv, torch.device(device)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            backends = [nv.Backend(nv.HW_GPU_ONLY, load_hint=HW_LOAD_HINT), nv.Backend(nv.GPU_ONLY),
                        nv.Backend(nv.HYBRID_CPU_GPU), nv.Backend(nv.CPU_ONLY)]  # fmt: skip
        else:
            index, backends = nv.NVIMGCODEC_DEVICE_CPU_ONLY, [nv.Backend(nv.CPU_ONLY)]
        with _quiet_stderr():
            self.decoder = nv.Decoder(device_id=index, backends=backends, options=":fancy_upsampling=1")
        # PIL does not turn images by their EXIF orientation, nor does open_clip's preprocess.
        self.params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB)
        self.spare: list = []

    def __call__(self, blobs: list[np.ndarray], stream: torch.cuda.Stream | None) -> list[Tensor | None]:
        """CHW uint8 views of the decoded images (None where one could not be decoded), valid until the
        next call, ready on ``stream`` (the caller waits for it)."""
        codes = [self.nv.CodeStream(blob) for blob in blobs]
        reuse = {"images": self.spare[: len(codes)]} if len(self.spare) >= len(codes) else {}
        handle = stream.cuda_stream if stream is not None else 0
        images = self.decoder.decode(codes, params=self.params, cuda_stream=handle, **reuse)
        self.spare = [image for image in images if image is not None] + self.spare[len(codes) :]
        return [None if image is None else self._tensor(image) for image in images]

    def decodes_on_device(self, jpeg: np.ndarray) -> bool:
        """Whether ``jpeg`` is decoded into this device's memory (on a GPU: not by the CPU fallback)."""
        image = self.decoder.decode(self.nv.CodeStream(jpeg), params=self.params)
        wanted = self.nv.ImageBufferKind.STRIDED_DEVICE if self.device.type == "cuda" else None
        return image is not None and (wanted is None or image.buffer_kind == wanted)

    def _tensor(self, image: object) -> Tensor:
        """A view of the decoded image (a host one where only the CPU backend could take the file)."""
        if image.buffer_kind == self.nv.ImageBufferKind.STRIDED_DEVICE:
            return torch.as_tensor(image, device=self.device).permute(2, 0, 1)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).to(self.device)


class TorchvisionJpegs:
    """nvJPEG's batched decode through torchvision (the CPU decoder of torchvision on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def __call__(self, blobs: list[np.ndarray], stream: torch.cuda.Stream | None) -> list[Tensor | None]:
        """It returns once the images are written (torchvision waits for its own stream)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.from_numpy(blob) for blob in blobs]
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with warnings.catch_warnings(), context:
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for its decoders
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as err:
                log.warning("batched JPEG decode failed (%s): decoding the batch one image at a time", err)
            return [self._one(blob, ImageReadMode.RGB, decode_jpeg) for blob in data]

    def decodes_on_device(self, jpeg: np.ndarray) -> bool:
        decoded = self([jpeg], None)[0]
        return decoded is not None and decoded.device.type == self.device.type

    def _one(self, blob: Tensor, mode: object, decode_jpeg: Callable) -> Tensor | None:
        try:
            return decode_jpeg([blob], mode=mode, device=self.device)[0]
        except RuntimeError:
            return None


_DECODERS: dict[str, Callable[[torch.device], Callable]] = {
    "nvimgcodec": NvImageCodecJpegs,
    "torchvision": TorchvisionJpegs,
}


class DeviceImageDecoder:
    """Completes a batch's ``images`` on ``device`` from its packed JPEG bytes."""

    def __init__(
        self, spec: ImageSpec, cpu: CpuDecoder, device: torch.device, library: str | None = None
    ) -> None:
        self.spec = spec
        self.cpu = cpu
        self.device = torch.device(device)
        self.library = library or jpeg_library(self.device) or "torchvision"
        self.jpegs = _DECODERS[self.library](self.device)
        # The decoders write on a stream of their own, which runs no kernel of the encoder: memory the
        # encoder's stream freed while its kernels are still queued is handed out again at once on that
        # stream, so decoding straight into it overwrote activations of the batch still running (2-GPU
        # H100 runs wrote rows that differed between runs, cosine down to 0.91). The encoder's stream
        # waits for the decode, and the decoded images are kept until the resize that reads them ran.
        self.pool = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.held: tuple[torch.cuda.Event, list[Tensor | None]] | None = None

    def __call__(self, batch: Batch) -> Batch:
        """``batch`` with ``images`` on the device for all its rows; rows whose JPEG no decoder reads move
        to ``errors``. Queues work on the device without waiting for it (beyond the decoder's own host
        work), so the batch before this one keeps the GPU busy meanwhile. Takes a worker's batch (uint8
        pixels are normalised on the device) or one already there."""
        batch = batch.to(self.device, self.spec.normalise)
        if batch.jpegs is None:
            return batch
        self._release()
        data = batch.jpegs.data.numpy()
        ends = np.cumsum(batch.jpegs.lengths.numpy()).tolist()
        starts = [0, *ends[:-1]]
        blobs = [data[a:b] for a, b in zip(starts, ends, strict=True)]
        decoded = self._decode(blobs)
        model_input, failed = self._complete(decoded, blobs)
        jpeg_rows = batch.jpegs.rows.tolist()
        if batch.images is None and not failed:
            images = model_input  # every row a JPEG, in order: no scatter
        else:
            images = torch.empty(len(batch.rows), 3, *self.spec.crop, device=self.device)
            if batch.images is not None:
                images[self._index(batch.image_rows)] = batch.images
            done = [i for i in range(len(blobs)) if i not in failed]
            if done:
                images[self._index([jpeg_rows[i] for i in done])] = model_input
        out = replace(batch, images=images, image_rows=None, jpegs=None)
        return out.drop({jpeg_rows[i]: reason for i, reason in failed.items()}) if failed else out

    def _decode(self, blobs: list[np.ndarray]) -> list[Tensor | None]:
        """The batch decoded on ``self.pool``, which the current stream then waits for."""
        decoded = self.jpegs(blobs, self.pool)
        if self.pool is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(self.pool)
            if self.library == "torchvision":  # images from torch's allocator, made on self.pool
                for image in decoded:
                    if image is not None:
                        image.record_stream(consumer)
        return decoded

    def _complete(
        self, decoded: list[Tensor | None], blobs: list[np.ndarray]
    ) -> tuple[Tensor | None, dict[int, str]]:
        """Model input of the decoded images in order (those the GPU refused decoded on the CPU), and why
        each of the images that no decoder read failed."""
        cpu_rows, failed = {}, {}
        for i, image in enumerate(decoded):
            if image is None:
                try:  # the CPU decoder tolerates some files the GPU refuses
                    cpu_rows[i] = self.cpu.image(blobs[i].tobytes())
                except Exception as err:  # noqa: BLE001 - a broken file is a record, not a crash
                    failed[i] = f"undecodable image: {type(err).__name__}: {err}"
        on_gpu = [i for i, image in enumerate(decoded) if image is not None]
        if not on_gpu and not cpu_rows:
            return None, failed
        pixels = self.resize([decoded[i] for i in on_gpu]) if on_gpu else None
        self._hold(decoded)
        if not cpu_rows:
            return self.spec.normalise(pixels), failed
        kept = [i for i in range(len(decoded)) if i not in failed]
        out = torch.empty(len(kept), 3, *self.spec.crop, device=self.device)
        place = {row: n for n, row in enumerate(kept)}
        if pixels is not None:
            out[self._index([place[i] for i in on_gpu])] = self.spec.normalise(pixels)
        cpu = sorted(cpu_rows)
        out[self._index([place[i] for i in cpu])] = torch.stack([cpu_rows[i] for i in cpu]).to(self.device)
        return out, failed

    def resize(self, images: list[Tensor]) -> Tensor:
        """Resized and cropped pixels (float32 of whole values) in the order given: images of one size
        together, one ``interpolate`` per size. (Batched matrix products over all sizes were measured
        slower on an H200 as written: docs/measurements/2026-12-04-photo-speed/.)"""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[tuple(image.shape)].append(i)
        if len(groups) == 1:
            return self._resize_group(images)  # one size (a uniform batch): no scatter
        out = torch.empty(len(images), 3, *self.spec.crop, device=self.device)
        for members in groups.values():
            out[self._index(members)] = self._resize_group([images[i] for i in members])
        return out

    def _resize_group(self, images: list[Tensor]) -> Tensor:
        """``images`` of one size, resized in chunks of at most RESIZE_CHUNK_VALUES input values."""
        channels, height, width = images[0].shape
        step = max(1, RESIZE_CHUNK_VALUES // (channels * height * width))
        if step >= len(images):
            return self.spec.pixels(torch.stack(images)).float()
        out = torch.empty(len(images), 3, *self.spec.crop, device=self.device)
        for start in range(0, len(images), step):
            out[start : start + step] = self.spec.pixels(torch.stack(images[start : start + step]))
        return out

    def _hold(self, decoded: list[Tensor | None]) -> None:
        """Keep the decoder's images (its memory, reused on the next call) until the resize read them."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.held = (event, decoded)

    def _release(self) -> None:
        if self.held is not None:
            self.held[0].synchronize()
            self.held = None

    def _index(self, rows: list[int] | Tensor) -> Tensor:
        """Row positions on the device, copied without making the host wait for the device."""
        index = torch.as_tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda" and not index.is_pinned():
            index = index.pin_memory()
        return index.to(self.device, non_blocking=True)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Standard error of the C libraries captured during one call and logged at debug level: their
    notes about optional libraries are not the user's business."""
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to redirect
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("nvImageCodec: %s", text)
