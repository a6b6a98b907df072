"""Encoding a batch on the device without losing it to an out-of-memory error.

A batch that does not fit is split in halves and retried, and the size that fitted becomes the most
this run sends at once from then on, so one oversized batch costs one retry, not the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class SplittingEncoder:
    """Calls ``encode(images, texts) -> {tower: embeddings}`` on chunks of at most ``max_batch`` rows."""

    def __init__(self, encode: Callable[..., dict[str, Tensor]], max_batch: int) -> None:
        self.encode = encode
        self.module = encode  # the set-up module, for strategies that need it
        self.max_batch = max_batch

    def __call__(self, images: Tensor | None, texts: Tensor | None) -> dict[str, Tensor]:
        rows = len(images if images is not None else texts)
        start, parts = 0, []
        while start < rows:
            stop = min(start + self.max_batch, rows)
            try:
                parts.append(
                    self.encode(*(x[start:stop] if x is not None else None for x in (images, texts)))
                )
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_out_of_memory(err) or stop - start == 1:
                    raise
                self.max_batch = max((stop - start) // 2, 1)
                log.warning(
                    "out of memory on %d rows: retrying in chunks of %d", stop - start, self.max_batch
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return {tower: torch.cat([p[tower] for p in parts]) for tower in parts[0]}
