"""Which rank does what in the hybrid strategy: ranks form pairs (a vision rank and a text rank), and the
pairs are data parallel. Pure and validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TowerLayout = Literal["adjacent", "halves"]


@dataclass(frozen=True)
class TowerPairs:
    """``adjacent``: pair ``g`` is ranks ``(2g, 2g+1)``, so a pair shares a node (and NVLink) whenever a
    node has an even number of devices. ``halves``: pair ``g`` is ranks ``(g, g + world/2)``, vision
    towers on the first half of the ranks."""

    world_size: int
    layout: TowerLayout = "adjacent"

    def __post_init__(self) -> None:
        if self.world_size < 2 or self.world_size % 2:
            raise ValueError(
                f"--strategy hybrid pairs a vision rank with a text rank, so it needs an even world size "
                f"of at least 2, not {self.world_size}: set --devices × --num_nodes to an even number"
            )
        if self.layout not in ("adjacent", "halves"):
            raise ValueError(f"unknown tower layout {self.layout!r}: use adjacent or halves")

    @property
    def num_pairs(self) -> int:
        """The data-parallel degree."""
        return self.world_size // 2

    def pair(self, rank: int) -> int:
        return rank // 2 if self.layout == "adjacent" else rank % self.num_pairs

    def vision_rank(self, pair: int) -> int:
        return 2 * pair if self.layout == "adjacent" else pair

    def text_rank(self, pair: int) -> int:
        return 2 * pair + 1 if self.layout == "adjacent" else pair + self.num_pairs

    def role(self, rank: int) -> Literal["vision", "text"]:
        return "vision" if rank == self.vision_rank(self.pair(rank)) else "text"

    def partner(self, rank: int) -> int:
        pair = self.pair(rank)
        return self.text_rank(pair) if self.role(rank) == "vision" else self.vision_rank(pair)


@dataclass(frozen=True)
class ParallelDims:
    """How a world of ranks is split: ``tensor_parallel`` ranks share one vision tower, ``towers`` ranks
    hold one tower each (2 under hybrid), and the groups that remain are data parallel. Checked when
    built, before any process group exists; a None (``--devices auto``; the tensor-parallel default,
    the devices of a node) is checked by Fabric once the ranks are known."""

    world_size: int | None
    tensor_parallel: int | None = 1
    towers: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise ValueError(f"--tensor_parallel_size must be >= 1, got {self.tensor_parallel}")
        if self.world_size is None or self.tensor_parallel is None:
            return
        group = self.tensor_parallel * self.towers
        if self.world_size < group or self.world_size % group:
            raise ValueError(
                f"--tensor_parallel_size {self.tensor_parallel} must divide the world size {self.world_size} "
                "(devices × nodes)"
                if self.towers == 1
                else f"a world of {self.world_size} ranks (devices × nodes) cannot be split into groups of "
                f"{group} ({self.tensor_parallel} tensor-parallel x {self.towers} tower ranks)"
            )

    @property
    def data_parallel(self) -> int | None:
        """How many groups take shards of their own; None until the ranks or group size are known."""
        if self.world_size is None or self.tensor_parallel is None:
            return None
        return self.world_size // (self.tensor_parallel * self.towers)


def world_size(devices: int | str, num_nodes: int) -> int | None:
    """Ranks of the job, where ``--devices`` is a count; None for ``auto`` (known once launched)."""
    return int(devices) * num_nodes if str(devices).isdigit() else None
