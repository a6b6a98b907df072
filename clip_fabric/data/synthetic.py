"""Generated pictures, the same for a given index on every run: the one generator of the package's
synthetic source, the benchmark's shards and the tests' images. Each ``picture`` kind stands for what a
decoder meets:

- ``smooth``: a bicubic upscale of coarse random pixels, like a photo's smooth areas, so that resampling
  filters compare fairly (the synthetic source, the GPU decoder's probe);
- ``photo``: a smooth field of three octaves plus mild noise, which compresses like a photo (pure noise
  would be several times larger, a flat field several times smaller): the benchmark's images;
- ``noise``: random pixels of any mode and format, where the tests need variety, not realism.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageChops

from clip_fabric.config import DataArgs
from clip_fabric.data import RawSample, Shard, chunk

JPEG_QUALITY = 90
# Noise levels of the ``photo`` pictures, chosen so that their JPEGs are as large as web photos of the
# same size (the figures: docs/benchmarks.md, 'The generated shards'; tests/test_benchmark.py).
NOISE_SIGMAS = (7, 9, 11, 13)
NOISE_SIDE = 1600
PICTURES = ("smooth", "photo", "noise")


def synthetic_image(
    index: int,
    size: tuple[int, int],
    picture: str = "smooth",
    mode: str = "RGB",
    fmt: str = "JPEG",
    quality: int | None = JPEG_QUALITY,
) -> bytes:
    """Picture ``index`` of kind ``picture`` (see the module's docstring), ``size`` = (width, height),
    encoded as ``fmt`` (``quality`` for JPEG; None: Pillow's default). ``mode`` other than RGB is for
    ``noise`` only: the others are what a camera gives."""
    if picture not in PICTURES:
        raise ValueError(f"picture {picture!r} is not one of {PICTURES}: pick one of them")
    rng = np.random.default_rng(index)
    if picture == "noise":
        image = _noise_picture(rng, size, mode)
    elif mode != "RGB":
        raise ValueError(f"mode {mode!r} is for the noise picture only: convert the {picture} one instead")
    else:
        image = _smooth_picture(rng, size) if picture == "smooth" else _photo_picture(rng, size)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": quality} if quality is not None else {}))
    return buf.getvalue()


def synthetic_jpeg(index: int, size: tuple[int, int]) -> bytes:
    """The synthetic source's JPEG: the ``smooth`` picture."""
    return synthetic_image(index, size, "smooth")


def _smooth_picture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    coarse = rng.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def _noise_picture(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    array = rng.integers(0, 256, size=(size[1], size[0], len(mode) if mode != "L" else 1), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode)


def _photo_picture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    small = (max(width // 4, 2), max(height // 4, 2))
    field = None
    for scale, weight in ((16, 1.0), (4, 0.33), (1, 0.14)):
        coarse = rng.integers(0, 256, size=(max(small[1] // scale, 2), max(small[0] // scale, 2), 3))
        layer = Image.fromarray(coarse.astype(np.uint8))
        layer = layer.resize(small, Image.BICUBIC) if layer.size != small else layer
        field = layer if field is None else Image.blend(field, layer, weight)
    image = field.resize(size, Image.BICUBIC)
    sigma = NOISE_SIGMAS[int(rng.integers(len(NOISE_SIGMAS)))]
    x, y = (int(v) for v in rng.integers(0, 256, 2))
    return ImageChops.add(image, _noise_field(size, sigma).crop((x, y, x + width, y + height)), 1.0, -128)


_NOISE: dict = {}


def _noise_field(size: tuple[int, int], sigma: int) -> Image.Image:
    """Gaussian noise around 128, 256 pixels larger than ``size`` each way and at least NOISE_SIDE
    square, so that the benchmark's photo-like set's many sizes share one field; made once per process."""
    size = (max(size[0], NOISE_SIDE), max(size[1], NOISE_SIDE))
    if (size, sigma) not in _NOISE:
        rng = np.random.default_rng(sigma)
        values = rng.normal(128, sigma, size=(size[1] + 256, size[0] + 256, 3))
        _NOISE[size, sigma] = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return _NOISE[size, sigma]


class SyntheticSource:
    def __init__(
        self, num_samples: int, shard_size: int, image_size: tuple[int, int], text_only: bool = False
    ):
        self.num_samples = num_samples
        self.shard_size = shard_size
        self.image_size = tuple(image_size)
        self.text_only = text_only

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> SyntheticSource:
        return cls(args.num_samples, args.shard_size, args.image_size, text_only)

    def shards(self) -> list[Shard]:
        return chunk(self.num_samples, self.shard_size, "synthetic")

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        for i in range(shard.start, shard.stop):
            image = None if self.text_only else synthetic_jpeg(i, self.image_size)
            yield RawSample(f"{i:09d}", image, f"a synthetic picture number {i}")

    def members(self, shard: Shard) -> list[str]:
        return [f"{i:09d}" for i in range(shard.start, shard.stop)]
