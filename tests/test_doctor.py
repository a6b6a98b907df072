"""``doctor``: each check on made-up machines (no GPU needed), and the command on this one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from clip_fabric import doctor
from tests.conftest import REPO

V100 = {"name": "Tesla V100-SXM2-32GB", "memory_gb": 31.7, "capability": (7, 0)}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "memory_gb": 79.2, "capability": (8, 0)}
VERSIONS = {"python": "3.11.7", "torch": "2.14.1", "lightning": "2.6.6", "open_clip_torch": "3.3.0",
            "cuda": "13.0", "nccl": "2.30.7", "transformer_engine": None, "torchao": None}  # fmt: skip


def statuses(checks: list[doctor.Check]) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_versions_missing_package_blocks_and_cpu_torch_warns():
    assert statuses(doctor.check_versions(VERSIONS))["torch"] == "ok"
    checks = statuses(doctor.check_versions(VERSIONS | {"open_clip_torch": None, "cuda": None, "nccl": None}))
    assert checks["open_clip_torch"] == "fail"
    assert checks["cuda (torch build)"] == "warn"


def test_fp8_line_says_whether_transformer_engine_runs_and_why_not():
    missing = doctor.check_fp8(
        (False, "transformer_engine is not installed (pip install transformer_engine[pytorch])")
    )
    assert missing.status == "warn" and "not installed" in missing.detail
    assert doctor.check_fp8((True, "transformer_engine 2.20.2: FP8 available on NVIDIA H200")).status == "ok"
    assert doctor.check_fp8(doctor.transformer_engine_status()).name == "fp8 (transformer_engine)"


def test_gpus_name_memory_capability_and_precision_hint():
    v100, a100 = doctor.check_gpus([V100, A100])[:2]
    assert "Tesla V100-SXM2-32GB, 31.7 GB, compute capability 7.0, fp16 only" == v100.detail
    assert "16-mixed" in v100.hint and a100.detail.endswith("bf16") and not a100.hint
    assert statuses(doctor.check_gpus([V100, A100]))["gpus"] == "warn"  # mixed models on one node


def test_no_gpu_warns_unless_required():
    assert doctor.check_gpus([])[0].status == "warn"
    assert doctor.check_gpus([], require_gpu=True)[0].status == "fail"


def test_distributed_nccl_missing_blocks_only_with_gpus():
    assert all(c.status == "ok" for c in doctor.check_distributed(True, True, False, have_gpus=False))
    assert statuses(doctor.check_distributed(True, True, False, have_gpus=True))["nccl"] == "fail"
    assert doctor.check_distributed(False, False, False, have_gpus=False)[0].status == "fail"


def test_launch_env_slurm_torchrun_and_neither():
    step = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "3", "SLURM_JOB_NAME": "clip-fabric"}  # fmt: skip
    (slurm,) = doctor.check_launch_env(step)
    assert slurm.status == "ok" and "SLURM_NTASKS=16" in slurm.detail and "SLURM_PROCID=3" in slurm.detail
    no_per_node = {k: v for k, v in step.items() if k != "SLURM_NTASKS_PER_NODE"}
    assert doctor.check_launch_env(no_per_node)[0].status == "fail"  # Fabric refuses it
    assert doctor.check_launch_env(step | {"SLURM_JOB_NAME": "bash"})[0].status == "warn"
    (torchrun,) = doctor.check_launch_env({"RANK": "1", "WORLD_SIZE": "4", "MASTER_PORT": "29400"})
    assert torchrun.name == "torchrun" and "WORLD_SIZE=4" in torchrun.detail
    assert doctor.check_launch_env({})[0].name == "launcher"


def test_rendezvous_port_as_fabric_picks_it_and_busy_port():
    assert doctor.rendezvous_port({"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "2"}) == (18456, False)
    assert doctor.rendezvous_port({"SLURM_JOB_ID": "1", "MASTER_PORT": "4000"}) == (4000, True)
    assert doctor.rendezvous_port({"RANK": "0", "WORLD_SIZE": "2"}) == (29500, False)
    assert doctor.rendezvous_port({}) == (None, False)
    assert doctor.check_port(None, explicit=False).status == "ok"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert doctor.check_port(port, explicit=True).status == "fail"
        assert doctor.check_port(port, explicit=False).status == "warn"
    assert doctor.check_port(port, explicit=True).status == "ok"


def test_nccl_variables_hints():
    checks = statuses(doctor.check_nccl_env({"NCCL_P2P_LEVEL": "NVL", "NCCL_P2P_DISABLE": "1"}, ["lo"], []))
    assert checks["NCCL_P2P_LEVEL"] == "warn" and checks["NCCL_P2P_DISABLE"] == "warn"
    assert checks["infiniband"] == "warn"
    ib = statuses(doctor.check_nccl_env({"NCCL_IB_DISABLE": "1"}, ["lo", "ib0"], ["mlx5_0"]))
    assert ib["NCCL_IB_DISABLE"] == "warn" and ib["infiniband"] == "ok"
    wrong = statuses(doctor.check_nccl_env({"NCCL_SOCKET_IFNAME": "ib"}, ["lo", "eth0"], []))
    assert wrong["NCCL_SOCKET_IFNAME"] == "fail"
    assert "NCCL_SOCKET_IFNAME" not in statuses(
        doctor.check_nccl_env({"NCCL_SOCKET_IFNAME": "eth"}, ["eth0"], [])
    )
    assert "NCCL_SOCKET_IFNAME" not in statuses(
        doctor.check_nccl_env({"NCCL_SOCKET_IFNAME": "^docker"}, ["lo"], [])
    )


def test_run_checks_on_a_gpu_node_without_nccl_fails():
    facts = {"versions": VERSIONS, "gpus": [A100], "dist_available": True, "gloo": True, "nccl": False,
             "interfaces": ["lo"], "ib_devices": [], "hostname": "n1", "addresses": ["10.0.0.1"],
             "rendezvous_addresses": [], "transformer_engine": (False, "not installed")}  # fmt: skip
    assert statuses(doctor.run_checks(facts, {}))["nccl"] == "fail"


def _doctor(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}  # no inherited SLURM/NCCL variables
    return subprocess.run([sys.executable, "-m", "clip_fabric", "doctor", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_doctor_command_on_this_machine():
    has_gpu = __import__("torch").cuda.is_available()
    result = _doctor("--json", "true")
    assert result.returncode == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["torch"]["status"] == "ok" and checks["launcher"]["status"] == "ok"
    if not has_gpu:
        assert checks["gpus"]["status"] == "warn"
        required = _doctor("--require_gpu", "true")
        assert required.returncode == 1 and "blocking: gpus" in required.stderr
        assert "WARN" in _doctor().stdout


def test_nodelist_and_tasks_per_node_as_slurm_writes_them():
    assert doctor.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert doctor.expand_nodelist("node[1-2]") == ["node1", "node2"] and doctor.expand_nodelist("a") == ["a"]
    step = {"SLURM_STEP_NODELIST": "n[1-3],x9", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}
    assert doctor.tasks_per_node(step) == {"n1": 2, "n2": 2, "n3": 2, "x9": 1}
    assert doctor.tasks_per_node({}) is None


def test_rendezvous_host_is_fabrics_first_node_or_master_addr():
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for nodelist in ("gpu[004-007],cpu1", "node7", "a1,b[2-3]", "n[7]", "n[08,10-12]", "gpu[1-2]-ib,x"):
        fabrics = SLURMEnvironment.resolve_root_node_address(nodelist)
        assert doctor.rendezvous_host({"SLURM_NODELIST": nodelist}) == fabrics, nodelist
    assert doctor.rendezvous_host({"SLURM_NODELIST": "gpu[004-007],cpu1"}) == "gpu004"
    assert doctor.rendezvous_host({"SLURM_NODELIST": "a[1-2]", "MASTER_ADDR": "10.0.0.9"}) == "10.0.0.9"
    assert doctor.rendezvous_host({}) is None


def test_hostname_on_loopback_blocks_gloo_across_nodes():
    assert doctor.check_hostname("n1", ["10.1.0.1"], nodes=2, have_gpus=False).status == "ok"
    assert doctor.check_hostname("n1", ["127.0.1.1"], nodes=1, have_gpus=False).status == "ok"
    loopback = doctor.check_hostname("n1", ["127.0.1.1"], nodes=2, have_gpus=False)
    assert loopback.status == "fail" and "GLOO_SOCKET_IFNAME" in loopback.hint
    assert doctor.check_hostname("n1", ["127.0.1.1"], nodes=2, have_gpus=True).status == "warn"  # NCCL


def _report(rank: int, node: str, gpus: int = 0, problems: tuple[str, ...] = ()) -> dict:
    return {
        "rank": rank,
        "node": node,
        "address": f"10.0.0.{node[-1]}",
        "gpus": gpus,
        "problems": list(problems),
    }


def test_every_node_from_rank_0_ranks_gpus_and_what_only_that_node_has():
    layout = {"n1": 2, "n2": 2}
    common = ("WARN infiniband",)
    reports = [_report(0, "n1", 2, common), _report(1, "n1", 2, common), _report(2, "n2", 2, common),
               _report(3, "n2", 2, (*common, "FAIL nccl (GPUs present but NCCL unavailable)"))]  # fmt: skip
    checks = {c.name: c for c in doctor.check_nodes(reports, layout, "n1:15007")}
    assert checks["node n1"].status == "ok" and "rank(s) 0, 1 reached n1:15007; 2/2 ranks, 2 GPU(s)" in (
        checks["node n1"].detail
    )
    assert checks["node n2"].status == "fail" and "FAIL nccl" in checks["node n2"].hint
    assert "infiniband" not in checks["node n2"].hint  # shared by all: rank 0's own line says it
    assert checks["ranks per node"].status == "ok" and "ranks" not in checks


def test_a_node_whose_ranks_never_arrive_and_uneven_or_gpu_mismatched_layouts():
    checks = {
        c.name: c
        for c in doctor.check_nodes([_report(0, "n1"), _report(1, "n1")], {"n1": 2, "n2": 2}, "n1:1")
    }
    assert (
        checks["node n2"].status == "fail"
        and "none of its 2 rank(s) reached n1:1" in checks["node n2"].detail
    )
    assert checks["ranks"].status == "fail" and "[2, 3]" in checks["ranks"].detail
    uneven = {
        c.name: c for c in doctor.check_nodes([_report(0, "n1"), _report(1, "n2")], {"n1": 1, "n2": 1}, "h")
    }
    assert uneven["ranks per node"].status == "ok"
    three = [_report(0, "n1"), _report(1, "n1"), _report(2, "n2")]
    assert statuses(doctor.check_nodes(three, {"n1": 2, "n2": 1}, "h"))["ranks per node"] == "fail"
    more_ranks_than_gpus = doctor.check_nodes(
        [_report(0, "n1", gpus=1), _report(1, "n1", gpus=1)], {"n1": 2}, "h"
    )
    assert statuses(more_ranks_than_gpus)["node n1"] == "fail"
    idle_gpus = doctor.check_nodes([_report(0, "n1", gpus=8)], {"n1": 1}, "h")
    assert statuses(idle_gpus)["node n1"] == "warn"


def test_tasks_meet_at_the_rendezvous_port_and_rank_0_gets_every_report(tmp_path):
    """Two real processes, as srun would start them on one node: rank 0 listens, rank 1 reports to it."""
    import torch.distributed  # noqa: F401  (imported before the threads of the store start)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    code = (
        "import json, sys; from clip_fabric import doctor; "
        "env = json.loads(sys.argv[1]); print(doctor.meet(env, {'rank': 1}, 30)[1].status)"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(env | {"SLURM_PROCID": "1"})],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    reports, line = doctor.meet(env | {"SLURM_PROCID": "0"}, {"rank": 0}, 30)
    assert other.wait(timeout=60) == 0 and other.stdout.read().strip() == "ok"
    assert (
        line.status == "ok"
        and "2/2 ranks met" in line.detail
        and sorted(r["rank"] for r in reports) == [0, 1]
    )
    alone, missing = doctor.meet(env | {"SLURM_PROCID": "1", "MASTER_PORT": str(port)}, {"rank": 1}, 2)
    assert alone is None and missing.status == "fail" and f"127.0.0.1:{port}" in missing.detail


def test_rendezvous_host_must_resolve_and_not_to_loopback_across_nodes():
    assert doctor.check_rendezvous_host(None, [], nodes=2) == []
    assert doctor.check_rendezvous_host("n1", ["10.0.0.1"], nodes=2)[0].status == "ok"
    assert doctor.check_rendezvous_host("localhost", ["127.0.0.1"], nodes=1)[0].status == "ok"
    (unresolved,) = doctor.check_rendezvous_host("n1", [], nodes=2)
    assert unresolved.status == "fail" and "MASTER_ADDR" in unresolved.hint
    (loopback,) = doctor.check_rendezvous_host("localhost", ["127.0.0.1", "::1"], nodes=2)
    assert loopback.status == "fail" and "unset MASTER_ADDR" in loopback.hint
