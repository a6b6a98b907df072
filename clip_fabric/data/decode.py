"""Decoding raw samples into model inputs on the CPU, in DataLoader workers.

Three image paths, chosen by ``--data.decode``:

- ``pil``: open_clip's own preprocess on a full PIL decode: the reference, bit for bit.
- ``cpu``: the same steps on uint8 tensors (torch's antialiased bicubic resize, which matches PIL's to
  two uint8 steps and is several times faster); for a GPU the batches travel as uint8 and the device
  normalises them; with ``scale_jpegs``, a JPEG of at least twice the
  model's input size is first decoded at a reduced scale (libjpeg's DCT scaling through PIL's ``draft``,
  or simplejpeg where it is installed).
- ``gpu``: JPEGs whose header the GPU decoder handles are only checked here and passed on as bytes, to be
  decoded and resized in batches on the device (``clip_fabric.data.device_decode``); everything else
  takes ``cpu``.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

try:  # optional: libjpeg-turbo with scaled decoding, about twice PIL's speed per core
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"
# Modes whose conversion to RGB commutes with resizing: the tensor path takes these, open_clip the rest.
TENSOR_MODES = ("RGB", "L")


@dataclass(frozen=True)
class ImageSpec:
    """What open_clip's eval preprocess does, read off its ``Compose``: resize the shortest side to
    ``resize`` (bicubic, antialiased), center-crop ``crop``, scale to [0, 1], normalise."""

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_preprocess(cls, preprocess: Callable) -> ImageSpec | None:
        """The spec of ``preprocess``, or None where it does something else (squash or letterbox resize,
        another interpolation), which only open_clip's own transforms then reproduce."""
        steps = list(getattr(preprocess, "transforms", []))
        kinds = [type(s).__name__ for s in steps]
        if kinds[:2] != ["Resize", "CenterCrop"] or "Normalize" not in kinds:
            return None
        resize, crop, norm = steps[0], steps[1], steps[kinds.index("Normalize")]
        size = resize.size if isinstance(resize.size, int) else None
        if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
            size = resize.size[0]
        if size is None or resize.interpolation != T.InterpolationMode.BICUBIC or resize.max_size:
            return None
        crop_size = tuple(crop.size) if isinstance(crop.size, (list, tuple)) else (crop.size, crop.size)
        return cls(size, crop_size, tuple(norm.mean), tuple(norm.std))

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing the shortest side to ``resize``, rounded as torchvision does."""
        short, long = min(height, width), max(height, width)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if height <= width else (new_long, self.resize)

    def apply(self, images: Tensor) -> Tensor:
        """The preprocess on a uint8 NCHW batch of one size, on its device: normalised float32."""
        return self.normalise(self.pixels(images))

    def pixels(self, images: Tensor) -> Tensor:
        """Resize and crop of a uint8 NCHW batch of one size: uint8 on the CPU (torch's uint8 kernel
        rounds like PIL's), elsewhere float32 rounded as PIL stores uint8 (antialiased uint8 resizing is
        CPU-only). :meth:`normalise` makes them model input."""
        height, width = images.shape[-2:]
        new = self.resized(height, width)
        x = images
        if (height, width) != new:
            if x.dtype == torch.uint8 and x.device.type == "cpu":
                x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
            else:
                x = F.interpolate(x.float(), size=new, mode="bicubic", antialias=True, align_corners=False)
                x = x.clamp_(0, 255).round_()
        crop_h, crop_w = self.crop
        top, left = int(round((new[0] - crop_h) / 2.0)), int(round((new[1] - crop_w) / 2.0))
        return x[:, :, top : top + crop_h, left : left + crop_w]

    def normalise(self, pixels: Tensor) -> Tensor:
        """Pixels (uint8, or float32 of whole values) as the model's float32 input, on their device: the
        same operations on the CPU and a GPU, so the values are equal to the bit."""
        mean, std = _normaliser(self.mean, self.std, pixels.device)
        return (pixels.float() / 255.0 - mean) / std


@functools.cache
def _normaliser(mean: tuple, std: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as (1, 3, 1, 1) tensors on ``device``, made once: a tensor built from Python
    numbers on a GPU is a copy the host waits for, which would stall the device stage every batch."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (mean, std))


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    mode: str
    progressive: bool


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Size and colour mode of a JPEG from its header alone (no decoding), or None if not a JPEG."""
    if not data.startswith(JPEG_MAGIC):
        return None
    with _without_pil_limit():  # the caller checks the size against --data.max_image_pixels
        image = Image.open(io.BytesIO(data))
    with image:
        if image.format != "JPEG":
            return None
        progressive = bool(image.info.get("progressive") or image.info.get("progression"))
        return JpegHeader(image.width, image.height, image.mode, progressive)


class CpuDecoder:
    """Decodes one image into the model's input tensor; tokenizes a batch of captions.

    ``mode`` is ``pil`` or ``cpu`` (see the module docstring); ``gpu`` routing lives in the stream.
    """

    def __init__(
        self,
        preprocess: Callable,
        tokenizer: Callable,
        max_image_pixels: int | None = None,
        mode: str = "pil",
        scale_jpegs: bool = False,
        normalise_on_device: bool = False,
    ) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels
        self.spec = ImageSpec.from_preprocess(preprocess)
        self.mode = mode if self.spec is not None else "pil"
        self.scale_jpegs = scale_jpegs
        self.normalise_on_device = normalise_on_device

    def check_pixels(self, width: int, height: int) -> None:
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            raise Image.DecompressionBombError(
                f"Image size ({width * height} pixels) exceeds limit of {self.max_image_pixels} pixels, "
                "could be decompression bomb DOS attack."
            )

    def image(self, data: bytes) -> Tensor:
        """Decode and preprocess one image into the model's float32 input; raises on anything that is
        not a readable image."""
        image = self._decode(data)
        return self.spec.normalise(image[None])[0] if image.dtype == torch.uint8 else image

    def decode(self, data: bytes) -> Tensor:
        """One image as it travels to the device. With ``normalise_on_device`` (a GPU), the ``cpu`` path
        hands on its resized and cropped uint8 pixels: a quarter of float32's bytes through shared
        memory, pinning and the copy, normalised there (``Batch.to``). Otherwise, and for images that
        open_clip's own preprocess takes, the model's float32 input. Raises on an unreadable image."""
        return self._decode(data) if self.normalise_on_device else self.image(data)

    def _decode(self, data: bytes) -> Tensor:
        """uint8 pixels from the ``cpu`` path, float32 model input from open_clip's preprocess."""
        if self.mode == "cpu":
            array = self._scaled_jpeg(data) if data.startswith(JPEG_MAGIC) else None
            if array is None:
                with self._open(data) as image:
                    if image.mode not in TENSOR_MODES:
                        # Palette, alpha, 16-bit, CMYK: open_clip resizes before converting to RGB,
                        # and the order changes the pixels, so its own preprocess runs.
                        return self.preprocess(image)
                    array = np.array(image.convert("RGB"))
            return self.spec.pixels(torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0))[0].contiguous()
        with self._open(data) as image:
            return self.preprocess(image)

    def _open(self, data: bytes) -> Image.Image:
        """The image, loaded, once its size passed ``max_image_pixels`` (PIL's own limit set aside)."""
        with _without_pil_limit():
            image = Image.open(io.BytesIO(data))
        self.check_pixels(image.width, image.height)
        image.load()
        return image

    def _scaled_jpeg(self, data: bytes) -> np.ndarray | None:
        """An RGB JPEG decoded at 1/2, 1/4 or 1/8 scale where that stays above the resize target; at
        full scale with simplejpeg; None where neither applies (PIL then decodes it whole)."""
        header = jpeg_header(data)
        if header is None:
            return None
        self.check_pixels(header.width, header.height)
        target = self.spec.resize
        short = min(header.width, header.height)
        large = self.scale_jpegs and short >= 2 * target
        if header.mode not in TENSOR_MODES:
            return None
        if simplejpeg is not None:
            # simplejpeg picks the smallest DCT scale whose output is at least min_width x min_height.
            scale = target / short if large else 1.0
            return simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                min_width=int(header.width * scale) + 1 if large else 0,
                min_height=int(header.height * scale) + 1 if large else 0,
            )
        if not large:
            return None
        with _without_pil_limit():
            image = Image.open(io.BytesIO(data))
        image.draft("RGB", (image.width * target // short + 1, image.height * target // short + 1))
        image.load()
        return np.array(image.convert("RGB"))

    def texts(self, captions: list[str]) -> Tensor:
        return self.tokenizer(captions)


@contextmanager
def _without_pil_limit() -> Iterator[None]:
    """PIL's process-wide decompression-bomb limit off for one ``Image.open``: ``max_image_pixels`` is
    checked by the decoder itself, so the option, not PIL's default, decides (and null lifts it)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def undecodable(err: BaseException) -> str:
    """An error record's reason for an image no decoder read: the exception in words, without PIL's
    ``<_io.BytesIO object at 0x...>`` (the record's key, source and path say which file)."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(its bytes)", str(err))
    return f"undecodable image: {type(err).__name__}: {text}"


def pack_bytes(blobs: list[bytes]) -> tuple[Tensor, Tensor]:
    """Many byte strings as one uint8 tensor and their lengths: one shared-memory handoff between
    processes instead of one per image."""
    lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    return data, lengths
