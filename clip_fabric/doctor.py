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
import re
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "warn", "fail"]
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT")  # fmt: skip
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_PORT = 29500  # torchrun's default rendezvous port


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
    backends = [f"{n} {versions[n]}" for n in ("transformer_engine", "torchao") if versions.get(n)]
    checks.append(
        Check("fp8 backend", "ok", ", ".join(backends))
        if backends
        else Check(
            "fp8 backend",
            "warn",
            "neither transformer_engine nor torchao is installed",
            "--precision fp8 needs one of them: pip install torchao (or transformer_engine[pytorch])",
        )
    )
    return checks


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


def check_launch_env(env: Mapping[str, str]) -> list[Check]:
    """The SLURM or torchrun variables this process sees, which Fabric turns into ranks."""
    slurm = {k: env[k] for k in SLURM_VARS if k in env}
    torchrun = {k: env[k] for k in TORCHRUN_VARS if k in env}
    checks = []
    if slurm:
        detail = " ".join(f"{k}={v}" for k, v in slurm.items())
        if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_NTASKS_PER_NODE" not in env:
            # Fabric's SLURMEnvironment refuses --ntasks without --ntasks-per-node
            checks.append(Check("slurm", "fail", detail, "use #SBATCH --ntasks-per-node, not --ntasks"))
        elif env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
            checks.append(
                Check(
                    "slurm", "warn", detail, "an interactive allocation: Fabric ignores SLURM; run under srun"
                )
            )
        else:
            checks.append(Check("slurm", "ok", detail))
    if torchrun:
        checks.append(Check("torchrun", "ok", " ".join(f"{k}={v}" for k, v in torchrun.items())))
    if not checks:
        checks.append(Check("launcher", "ok", "neither SLURM nor torchrun: Fabric starts the ranks itself"))
    return checks


def rendezvous_port(env: Mapping[str, str]) -> tuple[int | None, bool]:
    """The port rank 0 listens on, as Fabric picks it (None: Fabric finds a free one itself); True where
    the user set it (MASTER_PORT)."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"]), True
    if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env:  # Fabric's SLURMEnvironment
        return 15000 + int(env["SLURM_JOB_ID"][-4:]), False
    if "RANK" in env:
        return TORCHRUN_PORT, False
    return None, False


def check_port(port: int | None, explicit: bool, host: str = "127.0.0.1") -> Check:
    """Whether the rendezvous port is free here; a busy MASTER_PORT makes rank 0 fail to start."""
    if port is None:
        return Check("rendezvous port", "ok", "chosen free by Fabric at launch")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            hint = f"another process holds it (ss -ltnp | grep {port}); export MASTER_PORT=<a free port>"
            return Check(
                "rendezvous port", "fail" if explicit else "warn", f"{port} busy: {err.strerror}", hint
            )
    return Check("rendezvous port", "ok", f"{port} free")


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


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list (``gpu[01-03,07],login1``) as host names, in SLURM's order."""
    names = []
    for token in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", token)
        if not match:
            names.append(token)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for n in range(int(first), int(last or first) + 1):
                names.append(f"{prefix}{n:0{len(first)}d}{suffix}")
    return names


def tasks_per_node(env: Mapping[str, str]) -> dict[str, int] | None:
    """Ranks on each node of this SLURM step (``SLURM_TASKS_PER_NODE`` is ``2(x3),1``); None outside one."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    counts = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not nodelist or not counts:
        return None
    per_node = []
    for part in counts.split(","):
        count, _, times = part.partition("(x")
        per_node += [int(count)] * int(times.rstrip(")") or 1)
    return dict(zip(expand_nodelist(nodelist), per_node, strict=False))


def rendezvous_host(env: Mapping[str, str]) -> str | None:
    """The host rank 0 listens on, as Fabric picks it: MASTER_ADDR, else the first node of the step."""
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    if "SLURM_NODELIST" in env:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        return SLURMEnvironment.resolve_root_node_address(env["SLURM_NODELIST"])
    return None


def check_rendezvous_host(host: str | None, addresses: list[str], nodes: int) -> list[Check]:
    """Whether the rendezvous host resolves here, and to an address the other nodes can reach."""
    if host is None:
        return []
    detail = f"{host} -> {', '.join(addresses) or 'does not resolve'}"
    if not addresses:
        hint = (
            "every node must resolve the first node's name (DNS, /etc/hosts), or export MASTER_ADDR=<its IP>"
        )
        return [Check("rendezvous host", "fail", detail, hint)]
    if nodes > 1 and all(a.startswith("127.") or a == "::1" for a in addresses):
        return [
            Check(
                "rendezvous host",
                "fail",
                f"{detail}: on {nodes} nodes, the other nodes' ranks would connect to themselves",
                "unset MASTER_ADDR before sbatch (it passes your shell's environment on): Fabric then takes "
                "the first node of the allocation",
            )
        ]
    return [Check("rendezvous host", "ok", detail)]


def check_hostname(hostname: str, addresses: list[str], nodes: int, have_gpus: bool) -> Check:
    """gloo advertises the address this host's name resolves to: a loopback one sends the ranks of other
    nodes to themselves (NCCL picks its interface itself, so on GPUs it is a warning)."""
    detail = f"{hostname} -> {', '.join(addresses) or 'does not resolve'}"
    if nodes == 1 or (addresses and not all(a.startswith("127.") or a == "::1" for a in addresses)):
        return Check("hostname", "ok", detail)
    return Check(
        "hostname",
        "warn" if have_gpus else "fail",
        detail,
        "gloo (CPU ranks) needs a name the other nodes reach: fix /etc/hosts or DNS, or export "
        "GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) with the interface between nodes",
    )


def check_nodes(reports: list[dict], layout: dict[str, int], rendezvous: str) -> list[Check]:
    """Rank 0's view of the job after the tasks met at ``rendezvous``: one line per node (address, its
    ranks, its GPUs, its problems), and a failure for every rank that never arrived.

    ``reports``: what each arrived rank sent (``rank``, ``node``, ``address``, ``gpus``, ``problems``);
    ``layout``: ranks per node as SLURM placed them."""
    checks, arrived = [], {r["rank"] for r in reports}
    common = set.intersection(*(set(r["problems"]) for r in reports)) if reports else set()
    by_node: dict[str, list[dict]] = {}
    for report in reports:
        by_node.setdefault(report["node"], []).append(report)
    for node, expected in layout.items():
        here = sorted(by_node.pop(node, []), key=lambda r: r["rank"])
        if not here:
            checks.append(
                Check(
                    f"node {node}",
                    "fail",
                    f"none of its {expected} rank(s) reached {rendezvous}",
                    f"from {node}: getent hosts {rendezvous.rsplit(':', 1)[0]}; a firewall or the wrong "
                    "interface between nodes (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)",
                )
            )
            continue
        # What every node reports (a CPU-only torch, no InfiniBand) is in rank 0's own lines already.
        problems = sorted({p for r in here for p in r["problems"]} - common)
        failed = any(p.startswith("FAIL") for p in problems)
        gpus = here[0]["gpus"]
        detail = (
            f"{here[0]['address']}: rank(s) {', '.join(str(r['rank']) for r in here)} reached {rendezvous}; "
            f"{len(here)}/{expected} ranks, {gpus} GPU(s)"
        )
        status = "fail" if failed or len(here) < expected else "warn" if problems else "ok"
        if gpus and gpus != expected:  # more ranks than GPUs share one; fewer leave some idle
            status = "fail" if expected > gpus else "warn" if status == "ok" else status
            problems.append(
                f"{expected} ranks on {gpus} GPUs: keep --ntasks-per-node equal to --gpus-per-node"
            )
        hint = "; ".join(problems)
        checks.append(Check(f"node {node}", status, detail, hint))
    for node, here in by_node.items():  # ranks on a node the layout does not name
        checks.append(Check(f"node {node}", "warn", f"rank(s) {[r['rank'] for r in here]} not in the layout"))
    missing = sorted(set(range(sum(layout.values()))) - arrived)
    if missing:
        checks.append(
            Check(
                "ranks",
                "fail",
                f"{len(missing)} of {sum(layout.values())} never reached {rendezvous}: {missing}",
                "every task must run doctor (srun python -m clip_fabric doctor)",
            )
        )
    counts = set(layout.values())
    checks.append(
        Check(
            "ranks per node",
            "ok" if len(counts) == 1 else "fail",
            ", ".join(f"{n}: {c}" for n, c in layout.items()),
            "" if len(counts) == 1 else "Fabric needs the same number on every node: use --ntasks-per-node",
        )
    )
    return checks


def meet(env: Mapping[str, str], report: dict, timeout_s: float) -> tuple[list[dict] | None, Check]:
    """Every task of the step meets rank 0 at the rendezvous address and port, as Fabric's ranks will
    (a ``TCPStore``); rank 0 gets each rank's ``report`` (None for other ranks) and the line on its port."""
    from torch.distributed import TCPStore

    port, _ = rendezvous_port(env)
    host, rank = rendezvous_host(env), int(env["SLURM_PROCID"])
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    where = f"{host}:{port}"
    try:
        # The others wait longer than rank 0 (10 s of 60), so that rank 0 reports who is missing before
        # srun's --kill-on-bad-exit ends it for another rank's timeout.
        wait = timedelta(seconds=timeout_s + (min(10, timeout_s / 4) if rank else 0))
        store = TCPStore(host, port, is_master=rank == 0, timeout=wait, wait_for_workers=False)
        store.set(f"doctor/{rank}", jsonlib.dumps(report))
        if rank != 0:
            store.wait(["doctor/done"])  # rank 0 read this report
            return None, Check("rendezvous", "ok", f"reached rank 0 at {where}")
        keys, deadline = [f"doctor/{r}" for r in range(world)], time.monotonic() + timeout_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.2)
        reports = [jsonlib.loads(store.get(k)) for k in keys if store.check([k])]
        store.set("doctor/done", "1")
        time.sleep(0.5)  # the others' wait returns before this store closes
    except (RuntimeError, OSError) as err:  # DistStoreError and timeouts are RuntimeErrors
        reason = str(err).strip().splitlines()[0][:200]
        hint = "rank 0 not started or its node unreachable: check the name, the port, firewalls"
        return None, Check("rendezvous", "fail", f"{where} (rank {rank} of {world}): {reason}", hint)
    return reports, Check("rendezvous", "ok", f"rank 0 listens on {where}; {len(reports)}/{world} ranks met")


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
            "torchao": _installed("torchao"),
        },
        "gpus": gpus,
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
        *check_gpus(facts["gpus"], require_gpu),
        *check_distributed(facts["dist_available"], facts["gloo"], facts["nccl"], bool(facts["gpus"])),
        *check_launch_env(env),
        port_check,
        *check_rendezvous_host(rendezvous_host(env), facts["rendezvous_addresses"], nodes),
        *check_nccl_env(env, facts["interfaces"], facts["ib_devices"]),
        check_hostname(facts["hostname"], facts["addresses"], nodes, bool(facts["gpus"])),
    ]


def in_srun_step(env: Mapping[str, str]) -> bool:
    """Whether this process is one of several tasks that ``srun`` started (not the batch script itself)."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1


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


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(setup, as_positional=False)
