"""The device stage of the image path: JPEG bytes to model inputs in batches, on the GPU.

A batch's JPEGs are decoded together by one of two libraries, chosen once per run (``jpeg_library``):

- ``nvimgcodec`` (NVIDIA nvImageCodec, ``pip install 'clip_fabric[gpu-jpeg]'``): the GPU's hardware JPEG
  engines (A100, H100, H200) where present, its CUDA decoder for what they refuse, then its CPU one. The
  engines are not the GPU's multiprocessors, so they decode the next batch while the tower runs.
- ``torchvision`` (nvJPEG on the multiprocessors): always there with a CUDA build of torchvision.

Whatever their sizes, the images are then resized and center-cropped in a few batched kernels
(``resize.BatchResize``: open_clip's antialiased bicubic as matrix products), normalised as open_clip's
preprocess does, and placed among the rows the workers already decoded on the CPU.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from clip_fabric.data.batch import Batch
from clip_fabric.data.decode import CpuDecoder, ImageSpec, undecodable
from clip_fabric.data.resize import BatchResize, Windows

log = logging.getLogger(__name__)
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
        handle = stream.cuda_stream if stream is not None else 0
        try:
            codes = [self.nv.CodeStream(blob) for blob in blobs]
            reuse = {"images": self.spare[: len(codes)]} if len(self.spare) >= len(codes) else {}
            images = self.decoder.decode(codes, params=self.params, cuda_stream=handle, **reuse)
        except Exception as err:  # noqa: BLE001 - one file it cannot parse: each alone, the rest go on
            log.warning("batched JPEG decode failed (%s): decoding the batch one image at a time", err)
            self.spare = []
            images = [self._one(blob, handle) for blob in blobs]
        else:
            self.spare = [image for image in images if image is not None] + self.spare[len(codes) :]
        return [None if image is None else self._tensor(image) for image in images]

    def _one(self, blob: np.ndarray, handle: int) -> object | None:
        """One image decoded alone; None where nvImageCodec cannot (the CPU decoder tries it next)."""
        try:
            return self.decoder.decode(self.nv.CodeStream(blob), params=self.params, cuda_stream=handle)
        except Exception:  # noqa: BLE001
            return None

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


@dataclass
class Decoded:
    """A batch half way through the device stage (``DeviceImageDecoder.prepare``): its inputs on the
    device, its JPEGs decoded and packed for the resize, ready once ``ready`` has run on ``stream``."""

    batch: Batch
    windows: Windows | None = None
    on_gpu: list[int] = field(default_factory=list)
    cpu_rows: dict[int, Tensor] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None


class DeviceImageDecoder:
    """Completes a batch's ``images`` on ``device`` from its packed JPEG bytes, in two steps that may run
    in two threads: ``prepare`` (decode, cut each image to what its crop reads, pack the copies) and
    ``finish`` (resize, normalise, place the rows); calling it does both."""

    def __init__(
        self, spec: ImageSpec, cpu: CpuDecoder, device: torch.device, library: str | None = None
    ) -> None:
        self.spec = spec
        self.cpu = cpu
        self.device = torch.device(device)
        self.library = library or jpeg_library(self.device) or "torchvision"
        self.jpegs = _DECODERS[self.library](self.device)
        self.resize = BatchResize(spec)
        # ``prepare`` works on a stream of its own, which runs no kernel of the encoder: memory the
        # encoder's stream freed while its kernels are still queued is handed out again at once on that
        # stream, so decoding straight into it overwrote activations of the batch still running (2-GPU
        # H100 runs wrote rows that differed between runs, cosine down to 0.91). ``finish`` makes the
        # encoder's stream wait for it and marks what it made as used there.
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.held: torch.cuda.Event | None = None  # the decoder's images are read until this ran

    def __call__(self, batch: Batch) -> Batch:
        """``batch`` with ``images`` on the device for all its rows; rows whose JPEG no decoder reads move
        to ``errors``. Takes a worker's batch (uint8 pixels are normalised on the device) or one
        already there."""
        return self.finish(self.prepare(batch))

    def prepare(self, batch: Batch) -> Decoded:
        """Copy the batch to the device, decode its JPEGs (those the GPU refuses on the CPU) and pack
        them for the resize, all on ``self.side``; the host waits only for the decoder's own work."""
        with torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext():
            batch = batch.to(self.device, self.spec.normalise)
            if batch.jpegs is None:
                return Decoded(batch, ready=self._record())
            if self.held is not None:  # the decoder reuses its memory: the last copies must have run
                self.held.synchronize()
            data = batch.jpegs.data.numpy()
            ends = np.cumsum(batch.jpegs.lengths.numpy()).tolist()
            blobs = [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
            decoded = self.jpegs(blobs, self.side)
            out = Decoded(batch, on_gpu=[i for i, image in enumerate(decoded) if image is not None])
            for i, image in enumerate(decoded):
                if image is None:
                    try:  # the CPU decoder tolerates some files the GPU refuses
                        out.cpu_rows[i] = self.cpu.image(blobs[i].tobytes())
                    except Exception as err:  # noqa: BLE001 - a broken file is a record, not a crash
                        out.failed[i] = undecodable(err)
            if out.on_gpu:
                out.windows = self.resize.pack([decoded[i] for i in out.on_gpu])
            out.ready = self.held = self._record()
            return out

    def finish(self, step: Decoded) -> Batch:
        """The batch with its model input, on the current stream (after ``step.ready``)."""
        batch = step.batch
        if self.side is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(step.ready)
            made = [batch.images, batch.texts, *(step.windows.padded if step.windows else [])]
            for tensor in made:
                if tensor is not None and tensor.device.type == "cuda":
                    tensor.record_stream(consumer)
        if batch.jpegs is None:
            return batch
        model_input = self._model_input(step)
        jpeg_rows = batch.jpegs.rows.tolist()
        if batch.images is None and not step.failed:
            images = model_input  # every row a JPEG, in order: no scatter
        else:
            images = torch.empty(len(batch.rows), 3, *self.spec.crop, dtype=torch.float32, device=self.device)
            if batch.images is not None:
                images[self._index(batch.image_rows)] = batch.images
            done = [i for i in range(len(jpeg_rows)) if i not in step.failed]
            if done:
                images[self._index([jpeg_rows[i] for i in done])] = model_input
        out = replace(batch, images=images, image_rows=None, jpegs=None)
        return out.drop({jpeg_rows[i]: why for i, why in step.failed.items()}) if step.failed else out

    def _model_input(self, step: Decoded) -> Tensor | None:
        """Model input of the decoded JPEGs in their order, the GPU's and the CPU's rows together."""
        pixels = self.resize(step.windows) if step.windows is not None else None
        if not step.cpu_rows:
            return self.spec.normalise(pixels) if pixels is not None else None
        kept = sorted([*step.on_gpu, *step.cpu_rows])
        place = {row: n for n, row in enumerate(kept)}
        out = torch.empty(len(kept), 3, *self.spec.crop, dtype=torch.float32, device=self.device)
        if pixels is not None:
            out[self._index([place[i] for i in step.on_gpu])] = self.spec.normalise(pixels)
        cpu = sorted(step.cpu_rows)
        out[self._index([place[i] for i in cpu])] = torch.stack([step.cpu_rows[i] for i in cpu]).to(
            self.device
        )
        return out

    def _record(self) -> torch.cuda.Event | None:
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

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
