"""Decoding raw samples into model inputs on the CPU, in DataLoader workers.

Three image paths, chosen by ``--data.decode``:

- ``pil``: open_clip's own preprocess on a full PIL decode: the reference, bit for bit.
- ``cpu``: the same preprocess on a JPEG decoded at a reduced scale (libjpeg's DCT scaling through PIL's
  ``draft``, or simplejpeg where it is installed) when the image is at least twice the model's input size;
  smaller images and other formats take the ``pil`` path unchanged.
- ``gpu``: JPEGs whose header the GPU decoder handles are only checked here and passed on as bytes, to be
  decoded and resized in batches on the device (``clip_fabric.data.gpu``); everything else takes ``cpu``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

try:  # optional: libjpeg-turbo with scaled decoding, about twice PIL's speed per core
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"


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
    with Image.open(io.BytesIO(data)) as image:
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
    ) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels
        self.spec = ImageSpec.from_preprocess(preprocess)
        self.mode = mode if self.spec is not None else "pil"

    def check_pixels(self, width: int, height: int) -> None:
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            raise Image.DecompressionBombError(
                f"Image size ({width * height} pixels) exceeds limit of {self.max_image_pixels} pixels, "
                "could be decompression bomb DOS attack."
            )

    def image(self, data: bytes) -> Tensor:
        """Decode and preprocess one image; raises on anything that is not a readable image."""
        if self.mode == "cpu" and data.startswith(JPEG_MAGIC):
            scaled = self._scaled_jpeg(data)
            if scaled is not None:
                return self.preprocess(scaled)
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; a bomb is an error at any size past it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if self.max_image_pixels is not None:
                Image.MAX_IMAGE_PIXELS = self.max_image_pixels
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return self.preprocess(image)

    def _scaled_jpeg(self, data: bytes) -> Image.Image | None:
        """A JPEG decoded at 1/2, 1/4 or 1/8 scale, never below the resize target; None if no scale helps."""
        header = jpeg_header(data)
        if header is None:
            return None
        self.check_pixels(header.width, header.height)
        target = self.spec.resize
        if min(header.width, header.height) < 2 * target:
            return None
        if simplejpeg is not None and header.mode in ("RGB", "L"):
            # min_width/min_height: simplejpeg picks the smallest DCT scale that keeps both at least this.
            short = min(header.width, header.height)
            scale = target / short
            array = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                min_width=int(header.width * scale + 1),
                min_height=int(header.height * scale + 1),
            )
            return Image.fromarray(array)
        image = Image.open(io.BytesIO(data))
        short = min(image.size)
        image.draft("RGB", (image.width * target // short + 1, image.height * target // short + 1))
        image.load()
        return image

    def texts(self, captions: list[str]) -> Tensor:
        return self.tokenizer(captions)


def pack_bytes(blobs: list[bytes]) -> tuple[Tensor, Tensor]:
    """Many byte strings as one uint8 tensor and their lengths: one shared-memory handoff between
    processes instead of one per image."""
    lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    return data, lengths
