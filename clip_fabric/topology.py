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
