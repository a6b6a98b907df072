"""The MLP's first linear layer and its GELU as one matmul, for pure bf16 (``bf16-true``).

cuBLASLt applies GELU in the matmul's epilogue, so the ``[tokens, 4 x width]`` activation is written once
instead of written, read and written again, which made ViT-L-14's image tower faster in bf16. The
epilogue computes GELU's tanh approximation; it differs from the exact (erf) GELU by far less than
bf16's rounding of a value of that size, and the tower's embeddings stayed as close to float32 as those
of the exact GELU (the figures: docs/precision.md, 'GELU in the matmul'; docs/benchmarks.md, 'What made
the towers faster').
Other precisions keep the exact GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearGelu(nn.Linear):
    """``gelu(linear(x), approximate="tanh")``, in cuBLASLt's epilogue for a plain CUDA weight with a bias.

    It is an ``nn.Linear`` holding the replaced layer's Parameters, so the state dict and a
    tensor-parallel plan (which shards Linear layers into DTensors) see the layer they expect. Elsewhere
    (CPU, whose ``_addmm_activation`` computes the exact GELU; a sharded weight; no bias) it takes the
    unfused path, which computes the same tanh GELU, so every device and strategy runs one function.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters, not copies

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.data
        if self.bias is not None and type(weight) is torch.Tensor and weight.is_cuda:
            flat = x.reshape(-1, x.shape[-1])
            out = torch._addmm_activation(self.bias, flat, self.weight.t(), use_gelu=True)
            return out.view(*x.shape[:-1], self.out_features)
        return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")


def fuse_mlp_gelu(model: nn.Module) -> list[str]:
    """In every open_clip MLP (``c_fc``, ``gelu``, ``c_proj``) whose activation is ``nn.GELU``, make
    ``c_fc`` a :class:`LinearGelu` and ``gelu`` an identity, in place; return the MLPs' names.
    QuickGELU (OpenAI's weights) and other activations are left as they are."""
    fused = []
    for name, module in model.named_modules():
        c_fc, gelu = getattr(module, "c_fc", None), getattr(module, "gelu", None)
        if type(c_fc) is nn.Linear and type(gelu) is nn.GELU:
            module.c_fc, module.gelu = LinearGelu(c_fc), nn.Identity()
            fused.append(name)
    return fused
