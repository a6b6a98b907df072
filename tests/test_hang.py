"""A failure exits, it does not hang: DataLoader workers are reaped on every exit path, while stop signals
from anyone but their rank (SLURM signals every process of the step) leave them working."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from torch.utils.data import DataLoader, IterableDataset

from clip_fabric.preemption import worker_shield

# Runs the real CLI with the encoder failing at its 3rd batch of the rank named by FAIL_RANK, as a full
# disk or a bad row failed it, while the DataLoader workers are still reading shards.
FAILING_RUN = """
import errno, os, sys, time
from clip_fabric.model import Embedder

features, calls = Embedder.image_features, []

def image_features(self, images):
    calls.append(1)
    if len(calls) == 3 and os.environ.get("LOCAL_RANK", "0") == os.environ["FAIL_RANK"]:
        with open(os.environ["FAILED_AT"], "w") as f:
            f.write(str(time.time()))
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return features(self, images)

Embedder.image_features = image_features
from clip_fabric.__main__ import main
main(sys.argv[1:])
"""


class _Pids(IterableDataset):
    """Yields its worker's pid and the time, forever: a worker that is always busy."""

    def __iter__(self):
        while True:
            time.sleep(0.01)
            yield os.getpid(), time.monotonic()  # CLOCK_MONOTONIC: one clock for every process


def _pending(pid: int) -> set[signal.Signals]:
    """The stop signals sent to ``pid`` that none of its threads has taken yet."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    mask = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return {sig for sig in (signal.SIGTERM, signal.SIGUSR1) if mask >> (sig - 1) & 1}


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        os.kill(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][0] != "Z"


def test_worker_ignores_others_stop_signals_but_not_its_ranks():
    loader = DataLoader(_Pids(), batch_size=None, num_workers=1, worker_init_fn=worker_shield())
    batches = iter(loader)
    pid, _ = next(batches)
    try:
        for sig in ("TERM", "USR1"):  # from another process, as SLURM's step daemon sends them
            subprocess.run(["kill", f"-{sig}", str(pid)], check=True)
        deadline = time.monotonic() + 10
        while _pending(pid) and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        taken = time.monotonic()  # the worker's signal thread has taken both (or the worker is gone)
        assert _alive(pid), "a stop signal from outside must not end a worker"
        assert not _pending(pid), "the worker never took the signals"
        made = 0.0
        while made <= taken and time.monotonic() < deadline:  # batches queued before may come first
            got, made = next(batches)
            assert got == pid
        assert made > taken and _alive(pid), "a stop signal from outside must not end a worker"
        os.kill(pid, signal.SIGTERM)  # from the rank: what multiprocessing's exit handler sends
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the rank's own SIGTERM must end its worker"
    finally:
        del batches
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("devices", "fail_rank"),
    [(1, "0"), pytest.param(2, "1", marks=pytest.mark.slow), pytest.param(2, "0", marks=pytest.mark.slow)],
)
def test_error_with_workers_alive_exits_within_seconds(tmp_path, tiny_config, devices, fail_rank):
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    cmd = [
        sys.executable, str(script), "predict", "--accelerator", "cpu", "--devices", str(devices),
        "--model.config", str(tiny_config), "--data.format", "synthetic", "--data.image_size", "[64,48]",
        "--data.num_samples", "200", "--data.shard_size", "8", "--data.batch_size", "4",
        "--data.num_workers", "2", "--output.dir", str(tmp_path / "out"), "--timeout_s", "60",
    ]  # fmt: skip
    failed_at = tmp_path / "failed_at"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FAIL_RANK": fail_rank,
                        "FAILED_AT": str(failed_at), "PYTHONPATH": str(REPO)}  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        # Pipes close only when every process holding them (ranks, workers) is gone. The 30 s count
        # from the error; start-up (two interpreters on a busy machine) has its own allowance.
        output, _ = proc.communicate(timeout=120)
        exited = time.time()
    except subprocess.TimeoutExpired:
        pytest.fail("the failed run hung with its workers alive")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leave nothing behind whatever happened
        except ProcessLookupError:
            pass
    assert proc.returncode != 0
    assert exited - float(failed_at.read_text()) < 30, "the failed run took more than 30 s to exit"
    assert "clip_fabric: error: [Errno 28] No space left on device (injected)" in output  # one line
    assert "is killed by signal" not in output  # the reaped workers add no second, misleading error
    assert len(list((tmp_path / "out" / "_done").glob("*.json"))) < 26
