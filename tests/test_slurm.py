"""The slurm/*.sh job scripts on a real one-node Slurm (slurmctld + slurmd on localhost, started here):
ranks from SLURM's variables, preemption signal, requeue and resume, per-job logs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, progress_rows, read_output

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
# Debian 12 ships Slurm 22.05: auth/slurm (a key file, no daemon) arrived in 23.11, so a one-host cluster
# uses auth/none + cred/none rather than running munged; both daemons and all clients are on this host.
SLURM_CONF = """\
ClusterName=clipfabricci
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
# The scripts ask for GPU nodes; these sbatch options fit them to one CPU node with 2 tasks.
CPU_NODE = ["--partition=ci", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_slurm_installed() -> None:
    if all(shutil.which(b) for b in SLURM_BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "Slurm is not installed and cannot be (needs root and apt-get): apt-get install slurmd slurmctld"
        )
    install = [
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "slurmctld",
        "slurmd",
        "slurm-client",
    ]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot install Slurm (slurmctld slurmd slurm-client) with apt-get: {reason}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running one-node cluster; yields the environment its clients need. Stops both daemons after."""
    _ensure_slurm_installed()
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    cpus = max(2, os.cpu_count() or 2)  # 2 tasks of 1 CPU each; Slurm takes the node's real count if more
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=_free_port(), d_port=_free_port(), cpus=cpus))
    env = os.environ | {"SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        for cmd, log in (
            (["slurmctld", "-D", "-i"], (root / "slurmctld.out").open("w")),
            (["slurmd", "-D", "-N", "localhost"], (root / "slurmd.out").open("w")),
        )
    ]
    try:
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline and state != "idle":
            sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            state = sinfo.stdout.strip()
            time.sleep(0.5)
        if state != "idle":
            logs = "".join(p.read_text()[-1500:] for p in sorted(root.glob("*.out")))
            pytest.fail(f"the one-node Slurm did not come up (node state {state!r}):\n{logs}")
        # The job's ranks run `python -m clip_fabric` and `scontrol`: this interpreter's environment first.
        yield env | {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "HF_HUB_OFFLINE": "1"}
    finally:
        # Jobs end before the daemons stop, or their slurmstepd processes outlive the test.
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline
            and subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
        ):
            time.sleep(0.5)
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _tiny_predict_args(tiny_config: Path, out: Path, samples: int, *more: str) -> list[str]:
    return [
        "--accelerator", "cpu", "--precision", "32-true", "--model.config", str(tiny_config),
        "--model.pretrained", "null", "--data.format", "synthetic", "--data.source", "null",
        "--data.num_samples", str(samples), "--data.shard_size", "8", "--data.image_size", "[40,30]",
        "--data.batch_size", "4", "--data.num_workers", "1", "--output.dir", str(out),
        "--output.dtype", "float32", *more,
    ]  # fmt: skip


def _sbatch(env: dict, log: Path, script: str, *args: str) -> tuple[str, Path]:
    cmd = ["sbatch", "--parsable", *CPU_NODE, f"--output={log}", script, *args]
    # A free rendezvous port: Fabric's default under SLURM (15000 + the job id's last 4 digits) would be
    # 15001, 15002, ... here, which another cluster or test on a shared CI host may hold.
    env = env | {"MASTER_PORT": str(_free_port())}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"sbatch refused {script}: {result.stderr}"
    job = result.stdout.strip().split(";")[0]
    return job, Path(str(log).replace("%j", job))


def _finished(env: dict, job: str, timeout: float = 120) -> dict[str, str]:
    """The job's final record (``sbatch --wait`` polls with a back-off of up to 32 s: too slow here)."""
    deadline = time.monotonic() + timeout
    while (info := _job(env, job)).get("JobState") in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')} after {timeout} s"
        time.sleep(0.3)
    return info


def _job(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def test_1node_script_runs_data_parallel_ranks_from_slurm(slurm, tiny_config, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job-%j.out"
    job, log = _sbatch(
        slurm, log, "slurm/1node.sh", "configs/ddp.yaml", *_tiny_predict_args(tiny_config, out, 64)
    )
    state = _finished(slurm, job).get("JobState")
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    # Two ranks from SLURM_PROCID/SLURM_NTASKS, with --devices/--num_nodes taken from the allocation.
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert f"clip_fabric: job {job} restart 0 on localhost" in text
    emb, keys = read_output(out, "img_emb")
    assert keys == [f"{i:09d}" for i in range(64)] and emb.shape == (64, 32)
    assert read_output(out, "text_emb")[0].shape == (64, 32)  # configs/ddp.yaml's mode both
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_8node_script_requeues_on_preemption_and_resumes(slurm, tiny_config, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job-%j.out"
    samples = 16000  # 2,000 shards of 8: ~10 s of work on a 2-core CI host, ~20 times scancel's latency
    args = _tiny_predict_args(tiny_config, out, samples, "--mode", "image")
    job, log = _sbatch(slurm, log, "slurm/8node.sh", "configs/ddp.yaml", *args)

    def done() -> list[int]:
        return [int(p.stem) for p in (out / "_done").glob("*.json")]

    # The cue is rank 0's progress bar (the job log has the ranks' stderr): 64 rows means both ranks
    # passed predict's first barrier, so both hold their signal handler. The done markers were too late a
    # cue: the writer's thread writes them behind the loop, and by the first of them the ranks had once
    # computed every batch (CI, 4,800 samples): a signal with nothing left to stop.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and progress_rows(log.read_text() if log.exists() else "") < 64:
        assert _job(slurm, job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        time.sleep(0.05)
    assert len(done()) < samples // 8 // 2, "the ranks are half done: signal too late"
    # What Slurm does at --signal=USR1@120: SIGUSR1 to every task of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)

    deadline, ended = time.monotonic() + 120, None
    while time.monotonic() < deadline and (info := _job(slurm, job)).get("JobState") != "COMPLETED":
        # While Slurm requeues it, the job shows FAILED for a moment (its killed step's exit status) before
        # PENDING: only a final state that lasts means the job really ended.
        if info.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            ended = None
        elif (ended := ended or time.monotonic()) < time.monotonic() - 10:
            break
        if info.get("Reason") == "BeginTime":  # Slurm holds a requeued job ~2 minutes; skip that wait here
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
        time.sleep(0.3)
    text = log.read_text()
    # Predict stopped on the signal and Slurm accepted rank 0's `scontrol requeue`.
    # Rank 0 says so before it asks; SLURM's own proof is its step's cancel line or the rerun's header.
    assert "requeueing SLURM job" in text, (info, text[-1500:])
    requeued = ("DUE TO JOB REQUEUE" in text, f"job {job} restart 1" in text, info.get("Restarts") == "1")
    assert any(requeued), (info, text[-1500:])
    if info.get("JobState") == "COMPLETED" and f"job {job} restart 1" in text:
        assert info.get("Restarts") == "1", info  # came back once; --open-mode=append kept both runs' lines
    else:
        # In about 1 run in 6 on this one-node Slurm 22.05 the requeued job does not come back (it ends
        # FAILED; docs/slurm.md). The operator's remedy is tested instead: resubmit; the run resumes.
        subprocess.run(["scancel", job], env=slurm, capture_output=True)
        job, log = _sbatch(slurm, tmp_path / "again-%j.out", "slurm/8node.sh", "configs/ddp.yaml", *args)
        info = _finished(slurm, job)
        text = log.read_text()
    assert info.get("JobState") == "COMPLETED", (info, text[-1500:])
    emb, keys = read_output(out)
    assert keys == [f"{i:09d}" for i in range(samples)] and emb.shape == (samples, 32)  # every one, once
    resumed = [line for line in text.splitlines() if f"clip_fabric: {samples} rows" in line]
    assert resumed and f"this run {samples} rows" not in resumed[-1], "the requeued run must resume"


def test_hybrid_script_scores_pairs_on_slurm(slurm, tiny_config, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job-%j.out"
    args = _tiny_predict_args(tiny_config, out, 32, "--mode", "pair", "--data.batch_size", "4")
    job, log = _sbatch(slurm, log, "slurm/hybrid.sh", "configs/hybrid.yaml", *args)
    state = _finished(slurm, job).get("JobState")
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    metadata = pq.read_table(sorted((out / "metadata").glob("*.parquet"))[0]).to_pydict()
    assert "similarity" in metadata and len(list((out / "_done").glob("*.json"))) == 4
    assert "clip_fabric: 32 rows" in text
