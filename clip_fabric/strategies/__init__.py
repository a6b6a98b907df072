"""Fabric strategies by ``--strategy`` name. Each is a Fabric ``Strategy``; the predict loop never asks
which one it runs under."""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.strategies import Strategy

from clip_fabric.strategies.ddp import InferenceDDPStrategy
from clip_fabric.strategies.towers import TowerParallelStrategy

STRATEGIES: dict[str, type[Strategy]] = {"ddp": InferenceDDPStrategy, "model_parallel": TowerParallelStrategy}


def build_strategy(name: str, devices: int | str, num_nodes: int, timeout_s: int = 1800) -> Strategy | str:
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
    return STRATEGIES[name](timeout=timedelta(seconds=timeout_s))
