"""Whether this machine can run FP8, answered without importing torch or Lightning when the module loads:
``doctor`` asks it of every task of a job, and the FP8 plugins themselves live in ``fp8``."""

from __future__ import annotations

import importlib.util

MIN_FP8_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores


def fp8_backend() -> str | None:
    """``transformer_engine`` where it can run FP8 here (what ``--precision fp8`` uses), else None."""
    return "transformer_engine" if transformer_engine_status()[0] else None


def transformer_engine_status() -> tuple[bool, str]:
    """Whether Transformer Engine can run FP8 in this process, and why not (one line, for ``doctor``).

    Installed is not usable: its PyTorch extension (``transformer_engine_torch``) is built against one
    torch, and FP8 needs a GPU of capability 8.9+; each of these fails separately.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "transformer_engine is not installed (pip install transformer_engine[pytorch])"
    try:
        import transformer_engine
        import transformer_engine.pytorch as te
    except Exception as err:  # noqa: BLE001 - any import failure (ABI mismatch, missing .so) is the answer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return False, f"transformer_engine is installed but its PyTorch extension does not load: {first}"
    import torch

    version = getattr(transformer_engine, "__version__", "?")
    if not torch.cuda.is_available():
        return False, f"transformer_engine {version} loads, but no CUDA GPU is visible"
    available, reason = te.is_fp8_available(return_reason=True)
    name = torch.cuda.get_device_name()
    if not available:
        return False, f"transformer_engine {version} loads, but FP8 is unavailable on {name}: {reason}"
    return True, f"transformer_engine {version}: FP8 available on {name}"
