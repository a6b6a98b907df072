"""The hooks the predict and evaluate loops use, with the defaults of plain data parallelism.

Each strategy is a Fabric ``Strategy`` with this class mixed in; one that runs with Fabric's own
single-device strategy gets these defaults through ``hooks``. The loops never ask which one runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import ClassVar

from lightning.fabric.strategies import Strategy
from torch import nn

from clip_fabric.topology import ParallelDims


class InferenceStrategy:
    splits_towers: ClassVar[bool] = False
    """The towers run on different ranks or devices: only modes that run both towers per batch apply."""
    local_forward: ClassVar[bool] = True
    """A rank can run a forward alone (the batch-size probe needs that)."""
    encodes_texts_alone: ClassVar[bool] = True
    """Texts can be encoded without their images (a zero-shot classifier's prompts: ``evaluate``)."""
    retries_oom: ClassVar[bool] = True
    """A batch that runs out of memory may be retried in halves by this rank alone (not where the ranks
    of a group run each forward's collectives together: one rank's retry would leave the others behind)."""

    @classmethod
    def build(
        cls, dims: ParallelDims, timeout: timedelta, tower_layout: str = "adjacent"
    ) -> InferenceStrategy | Strategy:
        """The strategy for a validated layout; ``timeout`` bounds every collective."""
        return cls(timeout=timeout)

    @classmethod
    def dims(cls, world_size: int | None, tensor_parallel_size: int | None) -> ParallelDims:
        """This strategy's split of ``world_size`` ranks (raises a one-line ValueError if it cannot)."""
        if tensor_parallel_size is not None:
            raise ValueError("--tensor_parallel_size is for --strategy tensor_parallel")
        return ParallelDims(world_size)

    def reading_ranks(self, local_ranks: int) -> int:
        """How many of a node's ``local_ranks`` read and decode shards (and share its CPUs for that)."""
        return local_ranks

    def shard_split(self, rank: int, world_size: int) -> tuple[int, int] | None:
        """``(index, count)``: this rank takes every ``count``-th shard from ``index``; None: no shards."""
        return rank, world_size

    @property
    def writes(self) -> bool:
        """Whether this rank writes what it computes (ranks that compute one batch together write once)."""
        return True

    def agree_to_stop(self, stop: bool) -> bool:
        """Whether to stop before the next batch: this rank's signal, or, where ranks compute each batch
        together, any of theirs (then a collective every rank of the group calls every batch)."""
        return stop

    def partner_session(self, module: nn.Module) -> AbstractContextManager:
        """Where ranks work in pairs, the exchange between partners around the loop."""
        return nullcontext()


_DEFAULTS = InferenceStrategy()


def hooks(strategy: Strategy | str) -> InferenceStrategy:
    """The loop's hooks of ``strategy``: its own, or the defaults for Fabric's single-device strategy."""
    return strategy if isinstance(strategy, InferenceStrategy) else _DEFAULTS
