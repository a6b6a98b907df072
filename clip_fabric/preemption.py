"""Stopping cleanly when the scheduler says the job must go (SIGUSR1 or SIGTERM), and asking SLURM to
requeue it so that the rerun resumes from the shards already done."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by a stop signal; the predict loop finishes the shards it has open, then stops."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum
        log.warning("received %s: finishing the open shards, then stopping", signal.Signals(signum).name)

    def __bool__(self) -> bool:
        return self.signal is not None


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SLURM signals every process of the step, and a worker killed by
    the signal would fail the loader before the main process can finish its open shards."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (no-op outside SLURM); True if asked."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    if job_id is None:
        return False
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s; it resumes from the completed shards", job_id)
    return True
