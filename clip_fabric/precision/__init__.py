"""Precision by name (``--precision``): Fabric plugin objects for inference, and the ``auto`` choice made
from the GPU architecture."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clip_fabric.precision.fp8_support import MIN_FP8_CAPABILITY

if TYPE_CHECKING:
    from lightning.fabric.plugins.precision import Precision

# Torch and Lightning load with the first plugin built, not with this package: ``--help``, ``doctor`` and
# the choice of ``auto`` need neither. The plugin classes are still importable from here.
_LAZY = {
    "Fp32Precision": "plugins",
    "Fp32NormsMixedPrecision": "plugins",
    "Fp32NormsHalfPrecision": "plugins",
    "build_fp8": "fp8",
}

PRECISIONS = ("32-true", "16-mixed", "16-true", "bf16-mixed", "bf16-true", "fp8", "auto")
# Transformer Engine's FP8 was measured faster than bf16-true but outside the fidelity bound (image cosine
# 0.9999 to float32; docs/precision.md, docs/measurements/2026-12-01-fp8), so ``auto`` does not pick it.
# Set True only once a recipe is faster within the bound.
FP8_MEASURED_FASTER = False


def device_capability(accelerator: str = "auto") -> tuple[tuple[int, int] | None, str]:
    """(compute capability, name) of the GPU this process will use; (None, "cpu") without one."""
    import torch

    if accelerator == "cpu" or not torch.cuda.is_available():
        return None, "cpu"
    return torch.cuda.get_device_capability(), torch.cuda.get_device_name()


def choose_auto(capability: tuple[int, int] | None, device_name: str = "") -> tuple[str, bool, str]:
    """``--precision auto`` as a pure function of the GPU: (precision, tf32, why)."""
    gpu = f"{device_name} (sm_{capability[0]}{capability[1]})" if capability else device_name or "CPU"
    if capability is None:
        return "32-true", False, "no CUDA GPU: float32 (CPU half precision is slower, not faster)"
    if capability < (7, 0):
        return "32-true", False, f"{gpu} has no tensor cores: float32"
    if capability < (8, 0):
        # V100 (7.0) and T4 (7.5): fp16 tensor cores, no bf16.
        return "16-mixed", False, f"{gpu} has fp16 tensor cores and no bf16: 16-mixed with fp32 norms"
    if capability >= MIN_FP8_CAPABILITY and FP8_MEASURED_FASTER:
        return "fp8", True, f"{gpu} has FP8 tensor cores and FP8 was measured faster than bf16"
    # Pure bf16 is the fast path (autocast casts around every op) and stays within the project's fidelity
    # bound: the speed and the verify-precision cosines are in docs/precision.md.
    why = f"{gpu} has bf16 tensor cores: bf16-true (1.6x bf16-mixed, cosine >= 0.9999 to float32)"
    if capability >= MIN_FP8_CAPABILITY:
        why += (
            "; FP8 not chosen: faster than bf16-true but further from float32 (cosine 0.997-0.9985; "
            "docs/precision.md)"
        )
    return "bf16-true", True, why


def resolve_precision(name: str, accelerator: str = "auto") -> str:
    """The precision ``name`` stands for on this machine (``auto`` resolved), e.g. for a run's record."""
    return choose_auto(*device_capability(accelerator))[0] if name == "auto" else name


def tf32_changes_rows(
    name: str, tf32: bool, capability: tuple[int, int] | None, float32_logits: bool = False
) -> bool:
    """Whether ``--tf32`` (or TF32 chosen by ``auto``) changes what a run writes: the GPU has TF32
    (compute capability 8.0+; a CPU has none) and float32 matmuls remain under the precision. They do
    under every precision but ``bf16-true``: ``32-true`` is all float32, and the others keep norms and
    final projections in float32 (``fp32_parts``). ``bf16-true``'s one float32 matmul is the zero-shot
    logits (``float32_logits``)."""
    if name == "auto":
        name, auto_tf32, _ = choose_auto(capability)
        tf32 = tf32 or auto_tf32
    if not tf32 or capability is None or capability < (8, 0):
        return False
    return name != "bf16-true" or float32_logits


def tf32_fingerprint(name: str, tf32: bool, accelerator: str = "auto", float32_logits: bool = False) -> dict:
    """TF32 for a run's fingerprint: ``{"tf32": True}`` where it changes the rows, else nothing (absent
    means off, so that folders written before TF32 was recorded resume as they did)."""
    capability, _ = device_capability(accelerator)
    return {"tf32": True} if tf32_changes_rows(name, tf32, capability, float32_logits) else {}


def build_precision(name: str, tf32: bool = False, accelerator: str = "auto") -> Precision:
    """The Fabric precision plugin for ``--precision name`` (pass it as ``Fabric(plugins=...)``).

    ``auto`` resolves with ``choose_auto`` on this process's GPU and prints why; it turns TF32 on where
    it chooses so. ``fp8`` raises a one-line ValueError where the GPU or the packages cannot run it.
    """
    from clip_fabric.precision.fp8 import build_fp8
    from clip_fabric.precision.plugins import Fp32NormsHalfPrecision, Fp32NormsMixedPrecision, Fp32Precision

    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    capability, device_name = device_capability(accelerator)
    if name == "auto":
        name, auto_tf32, why = choose_auto(capability, device_name)
        tf32 = tf32 or auto_tf32
        print(f"clip_fabric: --precision auto chose {name}{' + TF32' if tf32 else ''}: {why}")
    if name == "32-true":
        return Fp32Precision(tf32)
    if name in ("16-mixed", "bf16-mixed"):
        return Fp32NormsMixedPrecision(name, "cpu" if capability is None else "cuda", tf32)
    if name == "16-true":
        return Fp32NormsHalfPrecision("16-true", fp32_norms=True, tf32=tf32)
    if name == "bf16-true":
        # Pure bf16, as Fabric's own: bf16 has float32's range, and pure half is the fast path.
        # The MLP's GELU in its matmul: measured faster at the same distance to float32 (fused_gelu).
        return Fp32NormsHalfPrecision("bf16-true", fp32_norms=False, tf32=tf32, gelu_epilogue=True)
    return build_fp8(capability, device_name, tf32)


def __getattr__(name: str) -> Any:
    """The plugin classes and the submodules, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in ("fp8", "fp8_support", "fp32_parts", "fused_gelu", "plugins"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
