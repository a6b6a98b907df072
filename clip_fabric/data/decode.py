"""Decoding raw samples into model inputs on the CPU, with open_clip's own preprocess and tokenizer."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

from PIL import Image
from torch import Tensor


class CpuDecoder:
    """PIL decode + open_clip preprocess per image; batched tokenization per batch of captions."""

    def __init__(
        self, preprocess: Callable, tokenizer: Callable, max_image_pixels: int | None = None
    ) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels

    def image(self, data: bytes) -> Tensor:
        """Decode and preprocess one image; raises on anything that is not a readable image."""
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; a bomb is an error at any size past it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if self.max_image_pixels is not None:
                Image.MAX_IMAGE_PIXELS = self.max_image_pixels
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return self.preprocess(image)

    def texts(self, captions: list[str]) -> Tensor:
        return self.tokenizer(captions)
