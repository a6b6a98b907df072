"""The job's checks: the SLURM/torchrun variables, the rendezvous address and port, and, run by ``srun``
as every task, the tasks meeting rank 0 there so that it reports what it sees of every node."""

from __future__ import annotations

import json as jsonlib
import re
import socket
import time
from collections.abc import Mapping
from datetime import timedelta

from clip_fabric.doctor.checks import Check

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT")  # fmt: skip
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_PORT = 29500  # torchrun's default rendezvous port


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
    """The host rank 0 listens on, as Fabric picks it: MASTER_ADDR, else the first node of the step
    (``SLURMEnvironment.resolve_root_node_address``'s answer, which tests/test_doctor.py checks: importing
    Lightning here would slow every task of the job, docs/startup.md, 'What was cut')."""
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    if "SLURM_NODELIST" in env:
        return expand_nodelist(env["SLURM_NODELIST"])[0]
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
        checks.append(_node_check(node, expected, here, common, rendezvous))
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


def _node_check(node: str, expected: int, here: list[dict], common: set[str], rendezvous: str) -> Check:
    """One node's line: its address, the ranks of its ``expected`` that arrived (``here``), its GPUs and
    the problems it reports beyond those ``common`` to every node."""
    if not here:
        return Check(
            f"node {node}",
            "fail",
            f"none of its {expected} rank(s) reached {rendezvous}",
            f"from {node}: getent hosts {rendezvous.rsplit(':', 1)[0]}; a firewall or the wrong "
            "interface between nodes (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)",
        )
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
        problems.append(f"{expected} ranks on {gpus} GPUs: keep --ntasks-per-node equal to --gpus-per-node")
    return Check(f"node {node}", status, detail, "; ".join(problems))


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


def in_srun_step(env: Mapping[str, str]) -> bool:
    """Whether this process is one of several tasks that ``srun`` started (not the batch script itself)."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
