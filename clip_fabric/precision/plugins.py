"""Fabric precision plugins for inference: float32 with a TF32 switch, and half precision (mixed or
true) that keeps norms and final projections in float32 (``fp32_parts``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Literal

import torch
from lightning.fabric.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch import nn
from typing_extensions import override

from clip_fabric.precision.fp32_parts import FP32_TYPES, keep_fp32, to_dtype_except
from clip_fabric.precision.fused_gelu import fuse_mlp_gelu


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions (Ampere and newer) inside the block, restored after:
    a scoped switch, so one run's choice does not leak into another Fabric in the same process."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


class Fp32Precision(Precision):
    """``32-true`` with ``tf32``: float32 weights and activations, matmuls in TF32 where asked."""

    precision = "32-true"

    def __init__(self, tf32: bool = False) -> None:
        self.tf32 = tf32

    @override
    def forward_context(self) -> AbstractContextManager:
        return tf32_matmuls(self.tf32)


class _Tf32Scope:
    """Mixed into a half-precision plugin: its forward context also scopes ``self.tf32``."""

    tf32: bool

    def forward_context(self) -> AbstractContextManager:
        stack = ExitStack()
        stack.enter_context(tf32_matmuls(self.tf32))
        stack.enter_context(super().forward_context())
        return stack


class Fp32NormsMixedPrecision(_Tf32Scope, MixedPrecision):
    """``16-mixed``/``bf16-mixed`` for inference: autocast, with every LayerNorm and the final
    projections computed in float32 (their weights stay float32; autocast is off inside them)."""

    def __init__(self, precision: Literal["16-mixed", "bf16-mixed"], device: str, tf32: bool = False) -> None:
        super().__init__(precision, device, scaler=None)
        self.scaler = None  # inference: no gradients to scale
        self.tf32 = tf32  # float32 work left by autocast (e.g. the projections) may use TF32

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        keep_fp32(module)
        return module


class Fp32NormsHalfPrecision(_Tf32Scope, HalfPrecision):
    """``16-true``/``bf16-true`` whose norms and final projections stay float32 (``fp32_norms``), or
    everything in half precision (``fp32_norms=False``, Fabric's own behaviour). With ``gelu_epilogue``
    (``bf16-true``) the MLPs' GELU runs in their first matmul (``fused_gelu``)."""

    def __init__(
        self,
        precision: Literal["16-true", "bf16-true"],
        fp32_norms: bool = True,
        tf32: bool = False,
        gelu_epilogue: bool = False,
    ) -> None:
        super().__init__(precision)
        self.fp32_norms = fp32_norms
        self.tf32 = tf32
        self.gelu_epilogue = gelu_epilogue

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        if self.fp32_norms:
            keep_fp32(module)
            to_dtype_except(module, self._desired_input_dtype, FP32_TYPES)
        else:
            module = super().convert_module(module)
        if self.gelu_epilogue:
            fuse_mlp_gelu(module)
        return module
