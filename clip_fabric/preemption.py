"""Stopping cleanly when the scheduler says the job must go (SIGUSR1 or SIGTERM), and asking SLURM to
requeue it so that the rerun resumes from the shards already done."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopRequest:
    """Set by a stop signal; the predict loop finishes the shards it has open, then stops.

    ``forward_to`` gives the pids of the ranks this process launched (Fabric's launcher is rank 0): a
    signal sent to rank 0 alone (``docker stop``, a pod's termination, ``kill``) reaches them too. Under
    SLURM every process gets the signal already; a second copy only repeats the request."""

    def __init__(self, forward_to: Callable[[], list[int]] = list) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._forward_to = forward_to

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        first, self.signal = self.signal is None, signum
        log.warning("received %s: finishing the open shards, then stopping", signal.Signals(signum).name)
        for pid in self._forward_to() if first else ():
            with suppress(ProcessLookupError):
                os.kill(pid, signum)

    def __bool__(self) -> bool:
        return self.signal is not None


class JobStop:
    """A stop request that any rank's signal raises for the whole job, through the process group's store
    (no collective: ranks reach their batches at different times). A signal that reached one rank only
    (``kill`` of one pid, a container runtime's) stops every rank at its next shard boundary instead of
    leaving the signalled rank waiting for the others at the end, up to ``--timeout_s``."""

    KEY = "clip_fabric/stop"

    def __init__(self, local: StopRequest, store: object | None, every_s: float = 0.25) -> None:
        self.local, self.store, self.every_s = local, store, every_s
        self.raised = False  # this rank's signal, or another's seen in the store
        self._published, self._checked = False, 0.0

    def __call__(self) -> bool:
        """Whether the job is stopping; asked before every batch, so the store is asked at most every
        ``every_s`` seconds."""
        if self.local and not self._published and self.store is not None:
            with suppress(RuntimeError):  # a store that is gone: this rank still stops
                self.store.set(self.KEY, "1")
            self._published = True
        if not self.raised and self.store is not None and not self.local:
            now = time.monotonic()
            if now - self._checked >= self.every_s:
                self._checked = now
                with suppress(RuntimeError):
                    self.raised = self.store.check([self.KEY])
        self.raised = self.raised or bool(self.local)
        return self.raised


def worker_shield() -> Callable[[int], None]:
    """The DataLoader ``worker_init_fn`` for workers of this process (see ``_shield_worker``)."""
    return functools.partial(_shield_worker, os.getpid())


def _shield_worker(owner_pid: int, worker_id: int) -> None:
    """Shield a DataLoader worker of ``owner_pid`` (the rank) from stop signals meant for the rank.

    SLURM signals every process of the step, and a worker killed by that signal would fail the loader
    before the rank can finish its open shards; so the worker blocks the stop signals and one thread
    takes them with their sender. A stop signal from the rank itself (multiprocessing's ``terminate``
    when the rank exits, on any path, or the DataLoader's shutdown) ends the worker at once; any other
    sender's is left to the rank. Ignoring them outright, as before, made workers that the rank's exit
    waits for forever: any exception with workers alive hung the job. The worker also dies with the
    thread that started it (``PR_SET_PDEATHSIG``), so a rank killed outright leaves no worker behind.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started from here inherit the mask
    _die_with_parent()
    threading.Thread(target=_take_stop_signals, args=(owner_pid,), name="stop-signals", daemon=True).start()


def _take_stop_signals(owner_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid == owner_pid:
            # The rank is shutting its workers down: nothing of a worker's is left to save. Status 0,
            # since torch's SIGCHLD handler in the rank reports any other as a second, misleading error
            # ("DataLoader worker ... is killed by signal") beside the one that made the rank exit.
            os._exit(0)


def _die_with_parent() -> None:
    """Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere the DataLoader's own watchdog remains."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


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
