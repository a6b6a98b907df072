"""Tower placement (``--strategy model_parallel``): the vision tower on one device, the text tower and
everything else on another, within one process.

Useful when both towers run on every batch (``both``/``pair``) and one device cannot hold both with a
useful batch, or to let two devices work on the two towers of one batch.
"""

from __future__ import annotations

import torch
from lightning.fabric.strategies import SingleDeviceStrategy
from torch import nn

from clip_fabric.strategies.base import InferenceStrategy
from clip_fabric.topology import ParallelDims


def place_towers(model: nn.Module, vision_device: torch.device, text_device: torch.device) -> None:
    """Move ``model.visual`` to ``vision_device`` and the rest to ``text_device``.

    Everything but ``visual`` is text: ``CLIP`` keeps its text tower as root attributes (transformer,
    token_embedding, positional_embedding, ln_final, text_projection, the attn_mask buffer), while
    ``CustomTextCLIP`` has a ``text`` module; ``logit_scale`` joins the text side, where the towers meet.
    Either device may be ``meta``, which drops that tower (hybrid ranks hold one tower each).
    """
    model._apply(lambda t: t.to(text_device), recurse=False)  # root parameters and buffers
    for name, child in model.named_children():
        child.to(vision_device if name == "visual" else text_device)


def _to_vision_device(module: nn.Module, args: tuple) -> tuple:
    device = next(module.parameters()).device
    return tuple(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args)


class TowerParallelStrategy(InferenceStrategy, SingleDeviceStrategy):
    """One process, two devices: the first device given runs the vision tower, the last the text tower.

    Fabric hands the process its devices (``--devices 2``: ``cuda:0`` and ``cuda:1``); inputs go to the
    text device (the root device), and a pre-hook on ``visual`` moves images to the vision device, so
    the model's own ``encode_image``/``encode_text`` run unchanged. With one device it degenerates to
    plain single-device inference.
    """

    splits_towers = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.parallel_devices: list[torch.device] | None = None  # filled in by Fabric's connector

    @classmethod
    def build(
        cls, dims: ParallelDims, timeout: object, tower_layout: str = "adjacent"
    ) -> TowerParallelStrategy:
        return cls()  # one process: no collectives to time out

    @property
    def vision_device(self) -> torch.device:
        return torch.device(self.parallel_devices[0]) if self.parallel_devices else super().root_device

    @property
    def root_device(self) -> torch.device:
        return torch.device(self.parallel_devices[-1]) if self.parallel_devices else super().root_device

    def module_to_device(self, module: nn.Module) -> None:
        model = getattr(module, "model", module)  # our Embedder wraps the open_clip model
        place_towers(model, self.vision_device, self.root_device)

    def setup_module(self, module: nn.Module) -> nn.Module:
        model = getattr(module, "model", module)
        model.visual.register_forward_pre_hook(_to_vision_device)
        return module
