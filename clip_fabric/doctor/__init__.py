"""``doctor``: the environment checklist before a distributed run (GPUs, versions, torch.distributed and
NCCL, the SLURM/torchrun variables, the rendezvous port, NCCL/InfiniBand settings); exit 1 on a blocker.
Run by ``srun`` as every task of a job, the tasks also meet at the rendezvous port, and rank 0 reports
what it sees of every node: which ranks reached it from where, ranks per node, each node's problems.

Each check is a pure function returning ``Check`` values, so it is tested without GPUs or a cluster.
"""

from __future__ import annotations

import importlib.metadata
import json as jsonlib
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clip_fabric.doctor.checks import (
    Check,
    check_distributed,
    check_fp8,
    check_gpus,
    check_nccl_env,
    check_versions,
)
from clip_fabric.doctor.cluster import (
    check_hostname,
    check_launch_env,
    check_nodes,
    check_port,
    check_rendezvous_host,
    expand_nodelist,
    in_srun_step,
    meet,
    rendezvous_host,
    rendezvous_port,
    tasks_per_node,
)
from clip_fabric.precision.fp8_support import transformer_engine_status

__all__ = [
    "Check", "check_distributed", "check_fp8", "check_gpus", "check_hostname", "check_launch_env",
    "check_nccl_env", "check_nodes", "check_port", "check_rendezvous_host", "check_versions",
    "expand_nodelist", "gather", "in_srun_step", "meet", "rendezvous_host", "rendezvous_port", "run_checks",
    "setup", "tasks_per_node", "transformer_engine_status",
]  # fmt: skip


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _addresses(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError:
        return []


def gather() -> dict[str, Any]:
    """What the checks read from this machine (the only function that touches torch and the system)."""
    import torch
    import torch.distributed as dist

    cuda_ok = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda_ok else 0):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_gb": props.total_memory / 2**30,
                     "capability": (props.major, props.minor)})  # fmt: skip
    nccl = None
    if torch.version.cuda and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):
            nccl = None
    ib = Path("/sys/class/infiniband")
    return {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "lightning": _installed("lightning"),
            "open_clip_torch": _installed("open_clip_torch"),
            "cuda": torch.version.cuda,
            "nccl": nccl,
            "transformer_engine": _installed("transformer_engine") or _installed("transformer-engine"),
        },
        "gpus": gpus,
        "transformer_engine": transformer_engine_status(),
        "dist_available": dist.is_available(),
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl": dist.is_available() and dist.is_nccl_available(),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "hostname": socket.gethostname(),
        "addresses": _addresses(socket.gethostname()),
        "rendezvous_addresses": _addresses(host) if (host := rendezvous_host(os.environ)) else [],
        "ib_devices": sorted(p.name for p in ib.iterdir()) if ib.is_dir() else [],
    }


def run_checks(facts: dict[str, Any], env: Mapping[str, str], require_gpu: bool = False) -> list[Check]:
    """Every check over the gathered ``facts`` and the environment ``env``."""
    port, explicit = rendezvous_port(env)
    nodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
    port_check = check_port(port, explicit)
    if in_srun_step(env) and env["SLURM_PROCID"] != "0":  # rank 0's doctor may be listening on it by now
        port_check = Check("rendezvous port", "ok", f"{port}: rank 0's to check, on its node")
    return [
        *check_versions(facts["versions"]),
        check_fp8(facts["transformer_engine"]),
        *check_gpus(facts["gpus"], require_gpu),
        *check_distributed(facts["dist_available"], facts["gloo"], facts["nccl"], bool(facts["gpus"])),
        *check_launch_env(env),
        port_check,
        *check_rendezvous_host(rendezvous_host(env), facts["rendezvous_addresses"], nodes),
        *check_nccl_env(env, facts["interfaces"], facts["ib_devices"]),
        check_hostname(facts["hostname"], facts["addresses"], nodes, bool(facts["gpus"])),
    ]


def setup(json: bool = False, require_gpu: bool = False, meet_timeout_s: float = 60) -> None:
    """Check this machine for a distributed run; exit status 1 when something blocks it.

    Run by ``srun`` as every task of a job (``srun python -m clip_fabric doctor``), the tasks meet rank 0
    at the rendezvous address and port, and rank 0 prints what it sees of every node (the others print
    only their blockers).

    Args:
        json: Print the checks as a JSON list instead of a table.
        require_gpu: Treat the absence of a CUDA GPU as a blocking failure (on GPU nodes).
        meet_timeout_s: Under srun: how long rank 0 waits for every rank at the rendezvous port, and
            the other ranks for rank 0.
    """
    env, facts = os.environ, gather()
    checks = run_checks(facts, env, require_gpu)
    shown = True
    if in_srun_step(env):
        problems = [f"{c.status.upper()} {c.name}" + (f" ({c.detail})" if c.status == "fail" else "")
                    for c in checks if c.status != "ok"]  # fmt: skip
        report = {"rank": int(env["SLURM_PROCID"]), "node": env.get("SLURMD_NODENAME", facts["hostname"]),
                  "address": ", ".join(facts["addresses"]), "gpus": len(facts["gpus"]),
                  "problems": problems}  # fmt: skip
        blocked = any(c.name == "rendezvous host" and c.status == "fail" for c in checks)
        reports, line = (None, None) if blocked else meet(env, report, meet_timeout_s)
        checks += [line] if line else []
        if reports is not None:
            port, _ = rendezvous_port(env)
            checks += check_nodes(reports, tasks_per_node(env) or {}, f"{rendezvous_host(env)}:{port}")
        shown = reports is not None or any(c.status == "fail" for c in checks)
    if shown and json:
        print(jsonlib.dumps([asdict(c) for c in checks], indent=2))
    elif shown:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(
                f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}" + (f"  -> {c.hint}" if c.hint else "")
            )
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        sys.exit(f"clip_fabric doctor: blocking: {', '.join(failed)}")
