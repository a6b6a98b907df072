"""The machine's checks: versions, GPUs, torch.distributed backends, NCCL/InfiniBand settings. Each is a
pure function returning ``Check`` values, so it is tested without GPUs or a cluster."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """One line of the report: ``fail`` blocks a run, ``warn`` deserves a look."""

    name: str
    status: Status
    detail: str
    hint: str = ""


def check_versions(versions: Mapping[str, str | None]) -> list[Check]:
    """Versions of the stack; a missing package that predict imports is a blocker."""
    checks = []
    for name in ("python", "torch", "lightning", "open_clip_torch"):
        version = versions.get(name)
        checks.append(
            Check(name, "ok", version)
            if version
            else Check(name, "fail", "not installed", f"pip install -e . (clip_fabric needs {name})")
        )
    cuda, nccl = versions.get("cuda"), versions.get("nccl")
    checks.append(
        Check("cuda (torch build)", "ok", cuda)
        if cuda
        else Check("cuda (torch build)", "warn", "torch is a CPU-only build", "install a CUDA wheel of torch")
    )
    checks.append(Check("nccl (torch build)", "ok" if nccl else "warn", nccl or "not built in"))
    return checks


def check_fp8(status: tuple[bool, str]) -> Check:
    """Whether ``--precision fp8`` (Transformer Engine) can run here, and why not
    (``precision.fp8_support.transformer_engine_status``): a warning, since every other precision still
    runs."""
    usable, why = status
    return Check("fp8 (transformer_engine)", "ok" if usable else "warn", why)


def check_gpus(gpus: list[dict[str, Any]], require_gpu: bool = False) -> list[Check]:
    """Each GPU's name, memory and compute capability, with the precision it supports.

    ``gpus``: ``{"name", "memory_gb", "capability": (major, minor)}`` per device.
    """
    if not gpus:
        return [
            Check(
                "gpus",
                "fail" if require_gpu else "warn",
                "no CUDA GPU visible",
                "run on a GPU node (check CUDA_VISIBLE_DEVICES, nvidia-smi); or --accelerator cpu",
            )
        ]
    checks = []
    for index, gpu in enumerate(gpus):
        major, minor = gpu["capability"]
        bf16 = major >= 8  # Ampere (sm_80) and later; V100 (7.0) and T4 (7.5) have fp16 only
        detail = f"{gpu['name']}, {gpu['memory_gb']:.1f} GB, compute capability {major}.{minor}"
        hint = "" if bf16 else "no bf16: use --precision 16-mixed (docs/hardware.md)"
        checks.append(Check(f"gpu {index}", "ok", detail + (", bf16" if bf16 else ", fp16 only"), hint))
    if len({g["name"] for g in gpus}) > 1:
        checks.append(
            Check("gpus", "warn", "mixed GPU models on this node", "ranks run at the slowest's pace")
        )
    return checks


def check_distributed(dist_available: bool, gloo: bool, nccl: bool, have_gpus: bool) -> list[Check]:
    """Whether torch.distributed can start a process group here (gloo on CPU, NCCL on GPUs)."""
    if not dist_available:
        return [
            Check("torch.distributed", "fail", "not available in this torch build", "install torch from PyPI")
        ]
    checks = [
        Check("torch.distributed", "ok", f"gloo {'yes' if gloo else 'no'}, nccl {'yes' if nccl else 'no'}")
    ]
    if have_gpus and not nccl:
        checks.append(
            Check("nccl", "fail", "GPUs present but NCCL unavailable", "install a CUDA build of torch")
        )
    return checks


def check_nccl_env(env: Mapping[str, str], interfaces: list[str], ib_devices: list[str]) -> list[Check]:
    """NCCL variables set, and whether they fit the interfaces and InfiniBand devices of this node."""
    nccl = {k: v for k, v in env.items() if k.startswith("NCCL_")}
    checks = [
        Check("nccl variables", "ok", " ".join(f"{k}={v}" for k, v in sorted(nccl.items())) or "none set")
    ]
    if env.get("NCCL_P2P_DISABLE") == "1":
        checks.append(Check("NCCL_P2P_DISABLE", "warn", "GPU peer-to-peer is off", "unset it once diagnosed"))
    if env.get("NCCL_P2P_LEVEL") in ("NVL", "PIX", "LOC"):
        checks.append(
            Check(
                "NCCL_P2P_LEVEL",
                "warn",
                f"{env['NCCL_P2P_LEVEL']} restricts P2P",
                "unset it: NCCL reads the topology",
            )
        )
    if env.get("NCCL_IB_DISABLE") == "1" and ib_devices:
        checks.append(
            Check(
                "NCCL_IB_DISABLE",
                "warn",
                f"InfiniBand present ({', '.join(ib_devices)}) but disabled",
                "multi-node traffic falls back to TCP sockets",
            )  # fmt: skip
        )
    if "NCCL_SOCKET_IFNAME" in env:
        wanted = [n.lstrip("^=") for n in env["NCCL_SOCKET_IFNAME"].split(",")]
        excluded = env["NCCL_SOCKET_IFNAME"].startswith("^")
        if not excluded and not any(i.startswith(w) for w in wanted for i in interfaces):
            checks.append(
                Check(
                    "NCCL_SOCKET_IFNAME",
                    "fail",
                    f"no interface matches {env['NCCL_SOCKET_IFNAME']}",
                    f"interfaces here: {', '.join(interfaces)}",
                )  # fmt: skip
            )
    checks.append(
        Check("infiniband", "ok", ", ".join(ib_devices))
        if ib_devices
        else Check("infiniband", "warn", "no InfiniBand device", "multi-node runs use TCP sockets")
    )
    return checks
