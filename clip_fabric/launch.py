"""Fabric, built in one place for every command: the strategy by name, the precision plugin, and the
launch options' help text, written once and shared by the commands' docstrings."""

from __future__ import annotations

import ctypes
import os
import signal
import textwrap
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from clip_fabric.precision import build_precision

if TYPE_CHECKING:  # imported where used: the commands' modules import this one for --help
    import torch.distributed as dist
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import Precision

LAUNCH_OPTIONS: dict[str, str] = {
    "accelerator": "Fabric accelerator: ``cpu``, ``cuda``, ``gpu`` or ``auto``.",
    "devices": "Devices per node (a count, or ``auto``).",
    "num_nodes": "Number of nodes.",
    "strategy": "``auto`` (one device, else data parallel), ``ddp``, ``model_parallel`` (the two towers on "
    "two devices of one process), ``hybrid`` (rank pairs, one tower each, pairs data parallel) or "
    "``tensor_parallel`` (the vision tower sharded over a group of ranks); see docs/strategies.md.",
    "precision": "``auto`` (the fastest precision measured within the fidelity bound on this "
    "GPU, reason printed: ``bf16-true`` on bf16 GPUs, ``16-mixed`` on V100/T4, ``32-true`` on the CPU), "
    "``32-true``, ``16-mixed`` / ``16-true`` (fp16, LayerNorms and final projections kept in fp32), "
    "``bf16-mixed``, ``bf16-true`` or ``fp8`` (Transformer Engine on Ada/Hopper: 1.17-1.29x bf16-true's "
    "images/s for ViT-L/H/bigG-14 on an H200, at image cosine 0.997-0.9985 to fp32); see docs/precision.md.",
    "tf32": "Let float32 matrix products use TF32 tensor cores (Ampere and newer).",
    "timeout_s": "Seconds a rank waits for the others in a collective before failing, so that a dead rank "
    "stops the job instead of hanging it; a rerun resumes.",
    "tower_layout": "``hybrid``: ``adjacent`` pairs ranks (2g, 2g+1), keeping a pair on one node; "
    "``halves`` pairs rank g with g + world/2.",
    "tensor_parallel_size": "``tensor_parallel``: ranks that share one vision tower (default: the devices "
    "of a node); the others are data parallel.",
}

F = TypeVar("F", bound=Callable)


def launch_docs(*names: str) -> Callable[[F], F]:
    """Fill a command docstring's ``{launch}`` line with the help of the launch options it takes, so
    that ``--help`` shows the same text for every command."""

    def document(fn: F) -> F:
        lines = []
        for name in names:
            lines += textwrap.wrap(f"{name}: {LAUNCH_OPTIONS[name]}", 104, subsequent_indent="    ")
        fn.__doc__ = fn.__doc__.replace("{launch}", "\n        ".join(lines))
        return fn

    return document


def build_fabric(
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | Precision = "auto",
    tf32: bool = False,
    timeout_s: int = 1800,
    tower_layout: str = "adjacent",
    tensor_parallel_size: int | None = None,
) -> Fabric:
    """The Fabric of a command, with its layout and precision validated before any process starts;
    ``precision`` is a ``--precision`` name or a plugin already built."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import Precision

    from clip_fabric.strategies import build_strategy

    plugin = precision if isinstance(precision, Precision) else build_precision(precision, tf32, accelerator)
    with warnings.catch_warnings():
        # Lightning's "srun is available but not used" hint, on every run of a machine with Slurm
        # installed: a run started without srun is one job on this node (docs/slurm.md starts jobs).
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
        return Fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=build_strategy(
                strategy, devices, num_nodes, timeout_s, tower_layout, tensor_parallel_size
            ),
            plugins=plugin,
        )


_PR_SET_PDEATHSIG = 1


def die_with_launcher(local_rank: int) -> None:
    """Make a rank that its node's launcher started (Fabric's launcher is local rank 0 itself; srun or
    torchrun otherwise) die the moment the launcher does. Without this, a rank 0 that failed left the
    others computing until their next collective failed."""
    if local_rank == 0 or not os.path.exists("/proc/self"):  # Linux only; rank 0 is the launcher
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher was gone before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def launched_ranks(fabric: Fabric) -> list[int]:
    """The pids of the ranks this process started (Fabric's launcher, on local rank 0); none elsewhere."""
    launcher = getattr(fabric.strategy, "launcher", None)
    return [proc.pid for proc in getattr(launcher, "procs", [])]


def job_store() -> dist.Store | None:
    """The default process group's key-value store, where there are several ranks: for what the ranks
    share without a collective (the progress count, a stop request), so that no rank waits on it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.distributed_c10d._get_default_store()
