"""Data parallelism for inference: every rank holds the whole model and embeds its own shards."""

from __future__ import annotations

from lightning.fabric.strategies import DDPStrategy
from torch import nn

from clip_fabric.strategies.base import InferenceStrategy


class InferenceDDPStrategy(InferenceStrategy, DDPStrategy):
    """Fabric's DDP launch, process group and device placement, without ``DistributedDataParallel``.

    The wrapper exists to all-reduce gradients; inference has none, so wrapping would only add a
    parameter broadcast at start-up and hooks on every forward.
    """

    def setup_module(self, module: nn.Module) -> nn.Module:
        return module
