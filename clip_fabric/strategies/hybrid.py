"""Hybrid parallelism (``--strategy hybrid``): pairs of ranks, one holding the vision tower and one the
text tower, replicated data parallel. Features cross between partners with point-to-point send/recv.

The vision rank reads, decodes and tokenizes every sample (so both towers see exactly the same rows,
bad samples included), sends the tokens of each batch to its partner, encodes the images meanwhile,
receives the text features back and writes the shard. The text rank only serves its partner.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clip_fabric.strategies.ddp import InferenceDDPStrategy
from clip_fabric.strategies.towers import place_towers
from clip_fabric.topology import ParallelDims, TowerLayout, TowerPairs

_DONE = -1


def embedding_dim(model: nn.Module) -> int:
    """The width of either tower's embeddings (CLIP projects both to one width)."""
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, nn.Linear):
        return projection.out_features
    if projection is not None:
        return projection.shape[-1]  # known on the meta device too, where a vision rank drops the text tower
    return model.text.output_dim  # CustomTextCLIP


class PairedEmbedder(nn.Module):
    """The vision rank's encoder: image features here, text features from the partner rank."""

    def __init__(self, encoder: nn.Module, partner: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.partner = partner

    def forward(self, images: Tensor | None = None, texts: Tensor | None = None) -> dict[str, Tensor]:
        header = torch.tensor(texts.shape, dtype=torch.int64, device=texts.device)
        sends = [dist.isend(header, self.partner), dist.isend(texts.contiguous(), self.partner)]
        try:
            image = self.encoder.image_features(images)  # while the partner encodes the texts
        except BaseException:
            # The partner encodes these texts anyway: take its reply, so that a retry of a smaller chunk
            # (out of memory) meets the partner at the next header instead of deadlocking the pair.
            dist.recv(
                torch.empty(len(texts), embedding_dim(self.encoder.model), device=texts.device), self.partner
            )
            for request in sends:
                request.wait()
            raise
        text = torch.empty_like(image)
        dist.recv(text, self.partner)
        for request in sends:
            request.wait()
        return self.encoder.combine(image, text)


class HybridTowerStrategy(InferenceDDPStrategy):
    splits_towers = True
    local_forward = False  # a vision rank's forward waits for its partner: no rank can probe alone
    encodes_texts_alone = False  # a text rank only serves the captions of its partner's pairs

    def __init__(self, layout: TowerLayout = "adjacent", **kwargs) -> None:
        super().__init__(**kwargs)
        self.layout = layout

    @classmethod
    def dims(cls, world_size: int | None, tensor_parallel_size: int | None) -> ParallelDims:
        if tensor_parallel_size is not None:
            raise ValueError("--tensor_parallel_size is for --strategy tensor_parallel")
        if world_size is not None:
            TowerPairs(world_size)  # its message says what hybrid needs
        return ParallelDims(world_size, towers=2)

    @classmethod
    def build(
        cls, dims: ParallelDims, timeout: timedelta, tower_layout: str = "adjacent"
    ) -> HybridTowerStrategy:
        TowerPairs(dims.world_size or 2, tower_layout)  # the layout name, checked before any process starts
        return cls(tower_layout, timeout=timeout)

    @property
    def pairs(self) -> TowerPairs:
        return TowerPairs(self.world_size, self.layout)

    @property
    def role(self) -> str:
        return self.pairs.role(self.global_rank)

    def reading_ranks(self, local_ranks: int) -> int:
        return max(local_ranks // 2, 1)  # text ranks read nothing: their partners read for them

    def shard_split(self, rank: int, world_size: int) -> tuple[int, int] | None:
        """A vision rank takes its pair's share of the shards; a text rank reads none."""
        return (self.pairs.pair(rank), self.pairs.num_pairs) if self.role == "vision" else None

    def module_to_device(self, module: nn.Module) -> None:
        meta = torch.device("meta")  # the tower this rank does not run is dropped, not kept in memory
        vision, text = (self.root_device, meta) if self.role == "vision" else (meta, self.root_device)
        place_towers(module.model, vision, text)

    def setup_module(self, module: nn.Module) -> nn.Module:
        partner = self.pairs.partner(self.global_rank)
        return PairedEmbedder(module, partner) if self.role == "vision" else module

    @contextmanager
    def partner_session(self, module: nn.Module) -> Iterator[None]:
        """Text rank: serve the partner until it is done. Vision rank: tell the partner when done."""
        partner = self.pairs.partner(self.global_rank)
        if self.role == "text":
            self._serve(module, partner)
            yield
            return
        try:
            yield
        finally:
            dist.send(torch.tensor([_DONE, 0], dtype=torch.int64, device=self.root_device), partner)

    def _serve(self, module: nn.Module, partner: int) -> None:
        header = torch.empty(2, dtype=torch.int64, device=self.root_device)
        while True:
            dist.recv(header, partner)
            rows, length = header.tolist()
            if rows == _DONE:
                return
            tokens = torch.empty(rows, length, dtype=torch.int64, device=self.root_device)
            dist.recv(tokens, partner)
            with torch.inference_mode(), self.precision.forward_context():
                dist.send(module.text_features(tokens).contiguous(), partner)
