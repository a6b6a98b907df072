"""Generated JPEG samples, the same for a given index on every run: for smoke tests and benchmarks."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

from clip_fabric.config import DataArgs
from clip_fabric.data import RawSample, Shard, chunk


def synthetic_jpeg(index: int, size: tuple[int, int]) -> bytes:
    """A smooth random picture (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(index)
    width, height = size
    coarse = rng.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


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
