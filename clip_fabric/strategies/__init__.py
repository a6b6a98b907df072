"""Fabric strategies by ``--strategy`` name. Each is a Fabric ``Strategy``; the predict loop never asks
which one it runs under."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta

from lightning.fabric.strategies import Strategy
from torch import nn

from clip_fabric.strategies.ddp import InferenceDDPStrategy
from clip_fabric.strategies.hybrid import HybridTowerStrategy
from clip_fabric.strategies.tensor_parallel import VisionTensorParallelStrategy
from clip_fabric.strategies.towers import TowerParallelStrategy
from clip_fabric.topology import TowerPairs

STRATEGIES: dict[str, type[Strategy]] = {
    "ddp": InferenceDDPStrategy,
    "model_parallel": TowerParallelStrategy,
    "hybrid": HybridTowerStrategy,
    "tensor_parallel": VisionTensorParallelStrategy,
}


def build_strategy(
    name: str,
    devices: int | str,
    num_nodes: int,
    timeout_s: int = 1800,
    tower_layout: str = "adjacent",
    tensor_parallel_size: int | None = None,
) -> Strategy | str:
    """The strategy for ``name``; ``auto`` is data parallel over several devices, else one device.

    ``timeout_s`` bounds every collective, so a rank that died fails the others instead of hanging them.
    """
    if name == "auto":
        if str(devices) == "1" and num_nodes == 1:
            return "auto"
        name = "ddp"
    if name not in STRATEGIES:
        raise ValueError(f"unknown --strategy {name!r}; choose one of: auto, {', '.join(STRATEGIES)}")
    if name == "model_parallel":
        return TowerParallelStrategy()  # one process: no collectives to time out
    if name == "hybrid":
        if str(devices).isdigit():  # validate the layout before any process starts
            TowerPairs(int(devices) * num_nodes, tower_layout)
        return HybridTowerStrategy(tower_layout, timeout=timedelta(seconds=timeout_s))
    if name == "tensor_parallel":
        return _tensor_parallel(devices, num_nodes, tensor_parallel_size, timedelta(seconds=timeout_s))
    return STRATEGIES[name](timeout=timedelta(seconds=timeout_s))


def _tensor_parallel(
    devices: int | str, num_nodes: int, size: int | None, timeout: timedelta
) -> VisionTensorParallelStrategy:
    """Tensor parallel within a node by default (``size`` = devices per node), data parallel across."""
    if size is None:
        return VisionTensorParallelStrategy(timeout=timeout)
    if not str(devices).isdigit():
        raise ValueError("--tensor_parallel_size needs a number of --devices, not 'auto'")
    world = int(devices) * num_nodes
    if size < 1 or world % size:
        raise ValueError(
            f"--tensor_parallel_size {size} must divide the world size {world} (devices × nodes)"
        )
    return VisionTensorParallelStrategy(size, data_parallel_size=world // size, timeout=timeout)


def writes(strategy: Strategy | object) -> bool:
    """Whether this rank writes what it computes (the ranks of a tensor-parallel group compute together)."""
    return getattr(strategy, "writes", True)


def data_parallel(strategy: Strategy | object, rank: int, world_size: int) -> tuple[int, int] | None:
    """``(index, count)`` of the shard split this rank takes; ``None`` when it takes no shards."""
    return getattr(strategy, "data_parallel", (rank, world_size))


def partner_session(strategy: Strategy | object, module: nn.Module) -> AbstractContextManager:
    """Where ranks work in pairs, the exchange between partners; otherwise nothing."""
    session = getattr(strategy, "partner_session", None)
    return session(module) if session is not None else nullcontext()


def stop_agreed(strategy: Strategy | object, stop: bool) -> bool:
    """Whether this rank stops before its next batch: its own stop signal, or, where ranks compute each
    batch together, any of theirs (a collective: every rank of such a group calls it every batch)."""
    agree = getattr(strategy, "agree_to_stop", None)
    return agree(stop) if agree is not None else stop
