"""The parts of a CLIP model that stay float32 under half precision: every LayerNorm and the two final
projections. The policy is named here, once; the precision plugins apply it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

# Norms whose output feeds a final projection: their output stays float32 too, so nothing between the
# last norm and the embedding is rounded to half.
FINAL_NORMS = frozenset({"ln_post", "ln_final"})
# Parameter projections used as ``x @ P``: ``proj`` of open_clip's VisionTransformer, ``text_projection``
# of CLIP (text tower at the root) and of TextTransformer (CustomTextCLIP's ``.text``).
PROJECTIONS = {"proj": (VisionTransformer,), "text_projection": (nn.Module,)}


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, enabled=False)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the autocast state or the input dtype.

    The output goes back to the input dtype so the next half-precision layer accepts it, except for the
    final norms (``fp32_output``), whose output goes on in float32 to the float32 projection.
    """

    def __init__(self, norm: nn.LayerNorm, fp32_output: bool = False) -> None:
        super().__init__(
            norm.normalized_shape,
            eps=norm.eps,
            elementwise_affine=norm.elementwise_affine,
            bias=norm.bias is not None,
            device=norm.weight.device if norm.weight is not None else None,
            dtype=torch.float32,
        )
        if norm.weight is not None:
            self.weight.data.copy_(norm.weight.data)
        if norm.bias is not None:
            self.bias.data.copy_(norm.bias.data)
        self.fp32_output = fp32_output

    def forward(self, x: Tensor) -> Tensor:
        with _no_autocast(x.device):
            out = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out if self.fp32_output else out.to(x.dtype)


class Fp32Projection(nn.Linear):
    """A final projection computed in float32 with autocast off; it returns float32.

    It is an ``nn.Linear`` (open_clip calls a Linear ``text_projection`` as a module) that also answers
    ``x @ projection`` through ``__rmatmul__`` (open_clip multiplies a Parameter projection), so it
    replaces either form without touching open_clip's forward code.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        # ``weight`` is [out, in], as nn.Linear holds it.
        super().__init__(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=torch.float32
        )
        self.weight.data.copy_(weight.data)
        if bias is not None:
            self.bias.data.copy_(bias.data)

    def forward(self, x: Tensor) -> Tensor:
        with _no_autocast(x.device):
            return F.linear(x.float(), self.weight, self.bias)

    def __rmatmul__(self, x: Tensor) -> Tensor:
        return self(x)  # through __call__, so module hooks see it as they see any layer


def keep_fp32(model: nn.Module) -> list[str]:
    """Swap every LayerNorm and each final projection of ``model`` for its float32 form, in place;
    return the names of the swapped modules. Call it before lowering the rest (``to_dtype_except``)."""
    swapped = []
    for name, module in list(model.named_modules()):
        for attr, owners in PROJECTIONS.items():
            value = getattr(module, attr, None)
            if not isinstance(module, owners) or isinstance(value, Fp32Projection):
                continue
            if isinstance(value, nn.Parameter) and value.ndim == 2:
                delattr(module, attr)  # a Parameter slot cannot hold a module
                setattr(module, attr, Fp32Projection(value.detach().T.float()))
            elif type(value) is nn.Linear:
                setattr(module, attr, Fp32Projection(value.weight.detach().float(), value.bias))
            else:
                continue
            swapped.append(f"{name}.{attr}" if name else attr)
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm) and not isinstance(child, Fp32LayerNorm):
                setattr(module, child_name, Fp32LayerNorm(child, fp32_output=child_name in FINAL_NORMS))
                swapped.append(f"{name}.{child_name}" if name else child_name)
    return swapped


def to_dtype_except(model: nn.Module, dtype: torch.dtype, keep: tuple[type, ...]) -> nn.Module:
    """``model.to(dtype)`` for floating parameters and buffers, except those of modules of the ``keep``
    types: casting all and back would round the float32 weights through half precision."""
    for module in model.modules():
        if isinstance(module, keep):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
    return model


FP32_TYPES = (Fp32LayerNorm, Fp32Projection)
