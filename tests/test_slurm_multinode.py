"""The slurm/*.sh job scripts across nodes: a Slurm cluster of three nodes on this machine, started here.

Each node is a network namespace of its own with its own address, hostname (a UTS namespace) and
``slurmd``; ``slurmctld`` runs in a fourth. They meet on a bridge inside the controller's namespace, on
a private subnet that exists only in these namespaces (no route leads out of them, and the host's own
network is never touched). The filesystem is shared, as a cluster's home or project filesystem is.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, read_output
from tests.test_slurm import _ensure_slurm_installed, _tiny_predict_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SUBNET = "10.213.20"  # inside the test's namespaces only: .1 the controller (and bridge), .11... the nodes
NODES = ("node1", "node2", "node3")
SLURM_CONF = """\
ClusterName=clipfabricmn
SlurmctldHost=ctl({subnet}.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
SlurmdTimeout={slurmd_timeout}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
{nodes}
PartitionName=ci Nodes=node[1-{count}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
SLURMD_TIMEOUT = 30  # seconds before slurmctld declares a silent node DOWN (Slurm's default: 300)
TIMEOUT_S = 10  # predict --timeout_s of the dead-node test: well under SLURMD_TIMEOUT
# CPU-sized options for the GPU scripts: 2 nodes x 2 tasks (4 gloo ranks) on the test partition.
TWO_NODES = ["--partition=ci", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


class Cluster:
    """The namespaces, the daemons and the client commands of one test cluster."""

    def __init__(self, root: Path, tag: str) -> None:
        self.root, self.tag = root, tag
        self.netns = {name: f"{tag}-{name}" for name in ("ctl", *NODES)}
        self.addr = {"ctl": f"{SUBNET}.1"} | {n: f"{SUBNET}.{11 + i}" for i, n in enumerate(NODES)}
        self.env = os.environ | {"SLURM_CONF": str(root / "slurm.conf")}
        for name in ("MASTER_ADDR", "MASTER_PORT"):  # the ranks take the rendezvous from the allocation
            self.env.pop(name, None)
        self.daemons: dict[str, subprocess.Popen] = {}

    def create_network(self) -> None:
        ctl = self.netns["ctl"]
        steps = [
            ["ip", "netns", "add", ctl],
            ["ip", "-n", ctl, "link", "set", "lo", "up"],
            ["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", ctl, "addr", "add", f"{self.addr['ctl']}/24", "dev", "br0"],
            ["ip", "-n", ctl, "link", "set", "br0", "up"],
        ]
        for node in NODES:
            ns = self.netns[node]
            steps += [
                ["ip", "netns", "add", ns],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                # One cable per node: "port" in the controller's namespace, eth0 in the node's.
                ["ip", "-n", ctl, "link", "add", node, "type", "veth", "peer", "name", "eth0", "netns", ns],
                ["ip", "-n", ctl, "link", "set", node, "master", "br0", "up"],
                ["ip", "-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0"],
                ["ip", "-n", ns, "link", "set", "eth0", "up"],
            ]
        for step in steps:
            result = _run(step)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(step)}: {result.stderr.strip()}")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addr.items())
        (self.root / "hosts").write_text(hosts)  # what DNS would say on a cluster: every node's address

    def remove_network(self) -> None:
        for name in self.netns:
            self.kill_namespace(name)
        for ns in self.netns.values():  # the veth pairs and the bridge go with their namespaces
            _run(["ip", "netns", "del", ns])

    def in_namespace(self, name: str, *cmd: str) -> list[str]:
        """``cmd`` as on host ``name``: its network, its hostname, its /etc/hosts; the same filesystem."""
        inner = f'mount --bind "$0" /etc/hosts && hostname {name} && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns[name]}", "unshare", "--mount", "--uts",
                "sh", "-c", inner, str(self.root / "hosts"), *cmd]  # fmt: skip

    def start(self, name: str) -> None:
        """Start host ``name``'s daemon: slurmctld on ``ctl``, slurmd on a node."""
        cmd = ["slurmctld", "-D", "-i"] if name == "ctl" else ["slurmd", "-D", "-N", name]
        log = (self.root / f"{name}.out").open("a")
        self.daemons[name] = subprocess.Popen(
            self.in_namespace(name, *cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def processes(self, name: str) -> list[int]:
        """Every process in host ``name``'s network namespace: its daemon, slurmstepd, the ranks."""
        inode = os.stat(f"/run/netns/{self.netns[name]}").st_ino
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.readlink(proc / "ns" / "net") == f"net:[{inode}]":
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return found

    def kill_namespace(self, name: str) -> None:
        """SIGKILL host ``name``: all its processes at once, as when a node loses power."""
        if not Path(f"/run/netns/{self.netns[name]}").exists():
            return
        for pid in self.processes(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if name in self.daemons:
            self.daemons.pop(name).wait(timeout=10)

    def client(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        """A Slurm client command on the controller's host (the only place a Slurm client reaches it)."""
        result = _run(["nsenter", f"--net=/run/netns/{self.netns['ctl']}", *cmd], env=self.env)
        assert not check or result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"
        return result

    def node_states(self) -> dict[str, str]:
        out = self.client("sinfo", "-h", "-N", "-o", "%N %t").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_idle(self, nodes: tuple[str, ...] = NODES, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.node_states().get(n) == "idle" for n in nodes):
                return
            time.sleep(0.5)
        logs = "".join(p.read_text()[-1500:] for p in sorted(self.root.glob("*.out")))
        raise AssertionError(f"nodes not idle: {self.node_states()}\n{logs}")

    def sbatch(self, log: Path, script: str, *args: str, **env: str) -> tuple[str, Path]:
        cmd = ["sbatch", "--parsable", *TWO_NODES, f"--output={log}", script, *args]
        result = _run(
            ["nsenter", f"--net=/run/netns/{self.netns['ctl']}", *cmd], cwd=REPO, env=self.job_env | env
        )
        assert result.returncode == 0, f"sbatch refused {script}: {result.stderr}"
        job = result.stdout.strip().split(";")[0]
        return job, Path(str(log).replace("%j", job))

    def job(self, job_id: str) -> dict[str, str]:
        out = self.client("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def finished(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id)).get("JobState") in (
            "PENDING",
            "RUNNING",
            "COMPLETING",
            "CONFIGURING",
        ):
            assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')} after {timeout} s"
            time.sleep(0.3)
        return info

    @property
    def job_env(self) -> dict[str, str]:
        """What sbatch passes to the job: this interpreter first, as the ranks run `python -m clip_fabric`."""
        return self.env | {"PATH": f"{Path(sys.executable).parent}:{self.env['PATH']}", "HF_HUB_OFFLINE": "1"}


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") and shutil.which("apt-get"):  # as tests/test_slurm.py installs Slurm
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "iproute2"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    missing = [b for b in ("ip", "nsenter", "unshare", "mount") if not shutil.which(b)]
    if missing:
        return f"no {', '.join(missing)} (apt-get install iproute2 util-linux mount)"
    probe = f"cfprobe-{uuid.uuid4().hex[:8]}"
    result = _run(["ip", "netns", "add", probe])
    _run(["ip", "netns", "del", probe])
    if result.returncode != 0:
        return f"cannot create a network namespace (ip netns add: {result.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    """Three running nodes and a controller; stops every process of them and removes the namespaces."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(f"no multi-node test cluster: {reason}")
    _ensure_slurm_installed()
    root = tmp_path_factory.mktemp("slurm-multinode")
    (root / "state").mkdir()
    for node in NODES:
        (root / "spool" / node).mkdir(parents=True)
    nodes = "\n".join(
        f"NodeName={n} NodeAddr={SUBNET}.{11 + i} CPUs=2 RealMemory=1000 State=UNKNOWN"
        for i, n in enumerate(NODES)
    )
    (root / "slurm.conf").write_text(
        SLURM_CONF.format(
            root=root, subnet=SUBNET, slurmd_timeout=SLURMD_TIMEOUT, nodes=nodes, count=len(NODES)
        )
    )
    cluster = Cluster(root, f"cf{uuid.uuid4().hex[:6]}")
    try:
        cluster.create_network()
        for name in ("ctl", *NODES):
            cluster.start(name)
        cluster.wait_idle()
        yield cluster
    finally:
        if cluster.daemons.get("ctl"):
            cluster.client("scancel", "--full", "--user=root")
            time.sleep(1)
        cluster.remove_network()


def _ranks_per_node(cluster: Cluster) -> dict[str, list[int]]:
    """The pids of the predict ranks on each node: children of slurmstepd (not their DataLoader workers)."""
    ranks = {}
    for node in NODES:
        pids = []
        for pid in cluster.processes(node):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                parent = Path(f"/proc/{ppid}/comm").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
            if b"clip_fabric" in cmdline and parent == "slurmstepd":
                pids.append(pid)
        ranks[node] = pids
    return ranks


def _connected_to(pid: int, addr: str, port: int) -> bool:
    """Whether process ``pid``'s network namespace has an established TCP connection to addr:port."""
    a, b, c, d = (int(x) for x in addr.split("."))
    word = f"{d:02X}{c:02X}{b:02X}{a:02X}"  # /proc/net/tcp*: 32-bit words little-endian, the port in hex
    remotes = {f"{word}:{port:04X}", f"0000000000000000FFFF0000{word}:{port:04X}"}  # IPv4, v4-mapped IPv6
    lines = []
    for table in ("tcp", "tcp6"):
        try:
            lines += Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
    return any(line.split()[2] in remotes and line.split()[3] == "01" for line in lines)


def _predict(tiny_config: Path, checkpoint: Path, out: Path, samples: int, *more: str) -> list[str]:
    return _tiny_predict_args(tiny_config, out, samples, "--model.pretrained", str(checkpoint), *more)


def _one_process(args: list[str], out: Path) -> None:
    """The same predict command in this process, on one rank: the rows the job must reproduce."""
    from clip_fabric.__main__ import main

    args = list(args)
    args[args.index("--output.dir") + 1] = str(out)
    main(["predict", *args, "--devices", "1", "--num_nodes", "1", "--strategy", "auto"])


def test_8node_script_on_two_nodes_writes_the_rows_of_one_process(
    cluster, tiny_config, tiny_checkpoint, tmp_path
):
    out = tmp_path / "out"
    args = _predict(tiny_config, tiny_checkpoint, out, 96, "--mode", "image")
    job, log = cluster.sbatch(
        tmp_path / "job-%j.out", "slurm/8node.sh", "configs/ddp.yaml", *args, CLIP_FABRIC_DOCTOR="1"
    )
    port = 15000 + int(job[-4:])  # Fabric's rendezvous port under SLURM when MASTER_PORT is not set
    seen, connected = {}, set()
    deadline = time.monotonic() + 120
    while (state := cluster.job(job).get("JobState")) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        for node, pids in _ranks_per_node(cluster).items():
            seen[node] = max(seen.get(node, 0), len(pids))
            connected |= {node for pid in pids if _connected_to(pid, cluster.addr["node1"], port)}
        time.sleep(0.2)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert f"clip_fabric: job {job} restart 0 on node[1-2]" in text
    assert all(f"GLOBAL_RANK: {r}, MEMBER: {r + 1}/4" in text for r in range(4)), text[-3000:]
    assert seen == {"node1": 2, "node2": 2, "node3": 0}, seen  # 2 ranks on each node of the allocation
    assert "node2" in connected, "node2's ranks never connected to node1's rendezvous port"
    assert text.count("clip_fabric: 96 rows") == 2  # Fabric prints on each node's first rank
    # doctor ran first, as every task: rank 0 says what it saw of each node at the rendezvous port.
    table, rendezvous = re.sub(r"[ \t]+", " ", text), f"node1:{port}"
    assert f"OK rendezvous rank 0 listens on {rendezvous}; 4/4 ranks met" in table, text[:4000]
    for node, ranks in (("node1", "0, 1"), ("node2", "2, 3")):
        line = (
            f"OK node {node} {cluster.addr[node]}: rank(s) {ranks} reached {rendezvous}; 2/2 ranks, 0 GPU(s)"
        )
        assert line in table, text[:4000]
    assert "OK ranks per node node1: 2, node2: 2" in table

    _one_process(args, tmp_path / "one")
    emb, keys = read_output(out)
    one, one_keys = read_output(tmp_path / "one")
    assert keys == one_keys == [f"{i:09d}" for i in range(96)]  # every sample, once, in shard order
    np.testing.assert_allclose(emb, one, atol=1e-6)


def test_doctor_ends_the_job_before_predict_when_the_rendezvous_is_loopback(cluster, tiny_config, tmp_path):
    """A MASTER_ADDR=localhost left in the submitting shell (sbatch passes it on) would send node2's ranks
    to themselves: doctor says so on every rank, and the job ends before predict starts."""
    args = _tiny_predict_args(tiny_config, tmp_path / "out", 16)
    job, log = cluster.sbatch(
        tmp_path / "job-%j.out", "slurm/8node.sh", "configs/ddp.yaml", *args,
        CLIP_FABRIC_DOCTOR="1", MASTER_ADDR="localhost",
    )  # fmt: skip
    info = cluster.finished(job)
    text = log.read_text()
    table = re.sub(r"[ \t]+", " ", text)
    assert info.get("JobState") == "FAILED" and "Initializing distributed" not in text, (info, text[-3000:])
    assert table.count("FAIL rendezvous host localhost -> 127.0.0.1") >= 2, text[-3000:]
    assert "on 2 nodes, the other nodes' ranks would connect to themselves" in table
    assert "blocking: rendezvous host" in text


def test_hybrid_script_on_two_nodes_scores_the_pairs_of_one_process(
    cluster, tiny_config, tiny_checkpoint, tmp_path
):
    out = tmp_path / "out"
    args = _predict(tiny_config, tiny_checkpoint, out, 32, "--mode", "pair")
    job, log = cluster.sbatch(tmp_path / "job-%j.out", "slurm/hybrid.sh", "configs/hybrid.yaml", *args)
    info = cluster.finished(job)
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED", text[-3000:]
    assert "on node[1-2]" in text and "MEMBER: 4/4" in text
    _one_process(args, tmp_path / "one")

    def pairs(folder: Path) -> dict:
        tables = [pq.read_table(p).to_pydict() for p in sorted((folder / "metadata").glob("*.parquet"))]
        return {k: s for t in tables for k, s in zip(t["key"], t["similarity"], strict=True)}

    two_nodes, one = pairs(out), pairs(tmp_path / "one")
    assert sorted(two_nodes) == [
        f"{i:09d}" for i in range(32)
    ]  # every pair once (2 pairs of ranks, 1 per node)
    np.testing.assert_allclose([two_nodes[k] for k in sorted(one)], [one[k] for k in sorted(one)], atol=1e-6)


def _done(out: Path) -> list[int]:
    return [int(p.stem) for p in (out / "_done").glob("*.json")]


def _wait_for_a_shard(cluster: Cluster, job: str, log: Path, out: Path, total: int) -> None:
    """Until the first shard is done: every rank has passed predict's first barrier, so each holds its
    stop-signal handler and is embedding or waiting for the others; most of the work is still ahead."""
    deadline = time.monotonic() + 90
    while not _done(out):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        time.sleep(0.05)
    assert len(_done(out)) < total // 2, "the ranks are nearly done: the fault comes too late"


def _until_final(cluster: Cluster, job: str, timeout: float = 150) -> dict[str, str]:
    """The job's state once it has ended for good, releasing a requeued job from Slurm's 2-minute hold.

    While Slurm requeues a job it shows FAILED or NODE_FAIL for a moment before PENDING: only an end state
    that lasts 10 s counts."""
    deadline, ended = time.monotonic() + timeout, None
    while time.monotonic() < deadline and (info := cluster.job(job)).get("JobState") != "COMPLETED":
        if info.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
            ended = None
        elif (ended := ended or time.monotonic()) < time.monotonic() - 10:
            break
        if info.get("Reason") == "BeginTime":
            cluster.client("scontrol", "update", f"JobId={job}", "StartTime=now")
        time.sleep(0.3)
    return info


def test_preemption_signals_every_task_on_every_node_and_the_requeued_job_resumes(
    cluster, tiny_config, tiny_checkpoint, tmp_path
):
    out = tmp_path / "out"
    args = _predict(tiny_config, tiny_checkpoint, out, 4800, "--mode", "image")  # 150 shards a rank
    # SLURM_LABELIO: srun's --label, so that each line of the log names the rank that wrote it.
    job, log = cluster.sbatch(
        tmp_path / "job-%j.out", "slurm/8node.sh", "configs/ddp.yaml", *args, SLURM_LABELIO="1"
    )
    _wait_for_a_shard(cluster, job, log, out, total=600)
    # What Slurm does at --signal=USR1@120: SIGUSR1 to every task of the job's steps, on every node.
    cluster.client("scancel", "--signal=USR1", job, check=True)
    info = _until_final(cluster, job)
    text = log.read_text()
    # Raw bytes split at "\n" only: a progress bar's "\r" is inside a labelled line, not the end of one.
    lines = log.read_bytes().decode(errors="replace").split("\n")
    signalled = {line.split(":", 1)[0] for line in lines if "received SIGUSR1" in line}
    assert signalled == {"0", "1", "2", "3"}, (signalled, text[-3000:])  # ranks 0, 1 on node1; 2, 3 on node2
    # Rank 0 says so before it asks; SLURM's own proof is its step's cancel line or the rerun's header.
    assert "requeueing SLURM job" in text, (info, text[-1500:])
    requeued = ("DUE TO JOB REQUEUE" in text, f"job {job} restart 1" in text, info.get("Restarts") == "1")
    assert any(requeued), (info, text[-1500:])
    if info.get("JobState") == "COMPLETED" and f"job {job} restart 1" in text:
        assert info.get("Restarts") == "1", info
    else:  # Slurm 22.05 sometimes ends a requeued job FAILED (docs/slurm.md): the operator resubmits
        cluster.client("scancel", job)
        job, log = cluster.sbatch(tmp_path / "again-%j.out", "slurm/8node.sh", "configs/ddp.yaml", *args)
        info = cluster.finished(job)
        text = log.read_text()
    assert info.get("JobState") == "COMPLETED", (info, text[-1500:])
    emb, keys = read_output(out)
    assert keys == [f"{i:09d}" for i in range(4800)] and emb.shape == (4800, 32)  # every sample, once
    resumed = [line for line in text.splitlines() if "clip_fabric: 4800 rows" in line]
    assert resumed and "this run 4800 rows" not in resumed[-1], "the requeued run must resume, not restart"


def test_a_dead_node_fails_the_job_within_the_timeout_and_the_job_completes_on_the_others(
    cluster, tiny_config, tiny_checkpoint, tmp_path
):
    out = tmp_path / "out"
    args = _predict(tiny_config, tiny_checkpoint, out, 2400, "--mode", "image", "--timeout_s", str(TIMEOUT_S))
    job, log = cluster.sbatch(tmp_path / "job-%j.out", "slurm/8node.sh", "configs/ddp.yaml", *args)
    _wait_for_a_shard(cluster, job, log, out, total=300)
    try:
        # node2 dies as a machine does: its cable first (its peers get no FIN, no RST), then every process.
        cluster.client("ip", "link", "set", "node2", "down", check=True)
        cluster.kill_namespace("node2")
        died = time.monotonic()
        # node1's ranks finish their shards, then wait for node2's in the final all-reduce: --timeout_s ends
        # that wait, long before Slurm notices the silent node (SlurmdTimeout).
        while _ranks_per_node(cluster)["node1"]:
            assert time.monotonic() - died < TIMEOUT_S + 15, f"node1's ranks hang: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        ranks_gone = time.monotonic() - died
        assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in log.read_text(), log.read_text()[-2000:]
        # Slurm declares node2 DOWN, ends the job NODE_FAIL and, as the script asks (--requeue), runs it
        # again on two live nodes, where it resumes from the shards done.
        info = _until_final(cluster, job, timeout=SLURMD_TIMEOUT + 120)
        text = log.read_text()
        assert "Node failure on node2" in text or "DUE TO NODE FAILURE" in text, (info, text[-2000:])
        if info.get("JobState") != "COMPLETED":  # not requeued: the operator resubmits
            job, log = cluster.sbatch(tmp_path / "again-%j.out", "slurm/8node.sh", "configs/ddp.yaml", *args)
            info = cluster.finished(job)
            text = log.read_text()
        assert info.get("JobState") == "COMPLETED" and info.get("NodeList") == "node[1,3]", (
            info,
            text[-2000:],
        )
        emb, keys = read_output(out)
        assert keys == [f"{i:09d}" for i in range(2400)] and emb.shape == (2400, 32)  # every sample, once
        resumed = [line for line in text.splitlines() if "clip_fabric: 2400 rows" in line]
        assert resumed and "this run 2400 rows" not in resumed[-1], "the rerun must resume, not restart"
        print(
            f"\nkilled node2; node1's ranks out after {ranks_gone:.1f} s (--timeout_s {TIMEOUT_S}); "
            f"job {job} {info['JobState']} on {info['NodeList']} after {info['Restarts']} restart(s)\n{text}"
        )
    finally:  # node2 comes back (ReturnToService=2), for the tests that follow
        cluster.client("ip", "link", "set", "node2", "up")
        cluster.kill_namespace("node2")
        cluster.start("node2")
        cluster.wait_idle(timeout=60)
