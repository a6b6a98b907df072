"""Fabric strategies by ``--strategy`` name, in one registry. Each is a Fabric ``Strategy`` with the
loop's hooks (``strategies.base``); the predict loop never asks which one it runs under."""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.strategies import Strategy

from clip_fabric.strategies.base import InferenceStrategy, hooks
from clip_fabric.strategies.ddp import InferenceDDPStrategy
from clip_fabric.strategies.hybrid import HybridTowerStrategy
from clip_fabric.strategies.tensor_parallel import VisionTensorParallelStrategy
from clip_fabric.strategies.towers import TowerParallelStrategy
from clip_fabric.topology import world_size

__all__ = ["STRATEGIES", "build_strategy", "hooks", "strategy_class"]

STRATEGIES: dict[str, type[InferenceStrategy]] = {
    "ddp": InferenceDDPStrategy,
    "model_parallel": TowerParallelStrategy,
    "hybrid": HybridTowerStrategy,
    "tensor_parallel": VisionTensorParallelStrategy,
}


def strategy_class(name: str, devices: int | str = 1, num_nodes: int = 1) -> type[InferenceStrategy] | None:
    """The class ``--strategy name`` runs; None for ``auto`` on one device (Fabric's own strategy)."""
    if name == "auto":  # data parallel over several devices, else one device
        return None if world_size(devices, num_nodes) == 1 else InferenceDDPStrategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown --strategy {name!r}; choose one of: auto, {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def build_strategy(
    name: str,
    devices: int | str,
    num_nodes: int,
    timeout_s: int = 1800,
    tower_layout: str = "adjacent",
    tensor_parallel_size: int | None = None,
) -> Strategy | str:
    """The strategy for ``name``, its layout validated before any process starts. ``timeout_s`` bounds
    every collective, so a rank that died fails the others instead of hanging them."""
    cls = strategy_class(name, devices, num_nodes)
    if cls is None:
        return "auto"
    dims = cls.dims(world_size(devices, num_nodes), tensor_parallel_size)
    return cls.build(dims, timedelta(seconds=timeout_s), tower_layout)
