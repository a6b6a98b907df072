"""FP8 inference on GPUs of compute capability 8.9 or newer: Fabric's transformer-engine precision where
``transformer_engine`` is installed, else torchao's float8 (dynamic activations, float8 weights)."""

from __future__ import annotations

import importlib.util

import torch
from lightning.fabric.plugins.precision import Precision
from torch import nn
from typing_extensions import override

from clip_fabric.precision.plugins import Fp32NormsHalfPrecision

MIN_FP8_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores


def fp8_backend() -> str | None:
    """``transformer_engine`` or ``torchao``, whichever is importable first; None when neither is."""
    for name in ("transformer_engine", "torchao"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def check_fp8(capability: tuple[int, int] | None, device_name: str, backend: str | None) -> None:
    """Raise a one-line ValueError unless this GPU and the installed packages can run FP8."""
    if capability is None:
        raise ValueError("--precision fp8 needs a CUDA GPU of capability 8.9+ (Ada, Hopper), none found")
    if capability < MIN_FP8_CAPABILITY:
        raise ValueError(
            f"--precision fp8 needs compute capability 8.9+ (Ada, Hopper); {device_name} is "
            f"sm_{capability[0]}{capability[1]}: use --precision bf16-mixed or auto"
        )
    if backend is None:
        raise ValueError(
            f"--precision fp8 on {device_name} needs transformer_engine or torchao, neither is installed: "
            "pip install torchao (or transformer_engine[pytorch]), or use --precision bf16-mixed"
        )


class TorchAOFloat8Precision(Fp32NormsHalfPrecision):
    """bf16 weights with fp32 norms and projections, and torchao float8 matmuls in the Linear layers
    whose sizes FP8 kernels accept (multiples of 16)."""

    def __init__(self, tf32: bool = False) -> None:
        super().__init__("bf16-true", fp32_norms=True, tf32=tf32)

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        from clip_fabric.precision.fp32_parts import Fp32Projection

        module = super().convert_module(module)

        def fp8_sized(layer: nn.Module, _: str) -> bool:
            return (
                type(layer) is not Fp32Projection
                and isinstance(layer, nn.Linear)
                and layer.in_features % 16 == 0
                and layer.out_features % 16 == 0
            )

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        quantize_(module, config, filter_fn=fp8_sized)
        return module


def build_fp8(capability: tuple[int, int] | None, device_name: str, tf32: bool = False) -> Precision:
    """The FP8 plugin for this GPU and installation, or a one-line ValueError saying why there is none."""
    backend = fp8_backend()
    check_fp8(capability, device_name, backend)
    if backend == "transformer_engine":
        from lightning.fabric.plugins.precision import TransformerEnginePrecision

        # As Fabric's own ``precision="transformer-engine"``: bf16 weights, TE layers in FP8.
        return TransformerEnginePrecision(weights_dtype=torch.bfloat16)
    return TorchAOFloat8Precision(tf32=tf32)
