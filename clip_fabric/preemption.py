"""Stopping cleanly when the scheduler says the job must go (SIGUSR1 or SIGTERM) or the user presses Ctrl-C
(SIGINT), and asking SLURM to requeue it so that the rerun resumes from the shards already done.

A stop signal is caught from the command's start (``stops_end_cleanly``): in set-up it ends the command
at once with exit 75; from a rank's start to its end (``StopRequest``) the rank finishes its open shards
first. A second Ctrl-C does not wait for them."""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import TypeVar

log = logging.getLogger(__name__)
# SIGINT is what a terminal's Ctrl-C sends to the whole process group: it stops a run as SIGTERM does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_RESUME = 75  # as ``run_folder.EXIT_RESUME``: sysexits' EX_TEMPFAIL, rerun to resume
Command = TypeVar("Command", bound=Callable)


class StopSignal(BaseException):
    """A stop signal where no shard is open (set-up), or a second Ctrl-C: the command ends now, exit 75.
    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` of set-up swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: object) -> None:
    raise StopSignal(signum)


def stops_end_cleanly(command: Command) -> Command:
    """Run ``command`` (``__main__.main``) with the stop signals caught from its first line: one that
    arrives in set-up (listing a large input, digesting the shard plan, checking the model) ends it with
    one line, a SLURM requeue and exit 75, as a stop during the loop does, instead of the signal's
    default action (death, or Ctrl-C's traceback)."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> object:
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
        try:
            return command(*args, **kwargs)
        except StopSignal as stop:
            name = signal.Signals(stop.signum).name
            if _launcher_rank() == 0:
                requeue_slurm_job()
            print(
                f"clip_fabric: stopped by {name} before the open shards were written: rerun the same "
                f"command to resume (exit status {EXIT_RESUME})",
                file=sys.stderr,
            )
            sys.exit(EXIT_RESUME)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return run  # type: ignore[return-value]


def _launcher_rank() -> int:
    """This process's global rank as the launcher set it (SLURM, torchrun), before any process group."""
    for name in ("SLURM_PROCID", "RANK"):
        with suppress(KeyError, ValueError):
            return int(os.environ[name])
    return 0


class StopRequest:
    """Set by a stop signal; the predict loop finishes the shards it has open, then stops.

    ``forward_to`` gives the pids of the ranks this process launched (Fabric's launcher is rank 0): a
    signal sent to rank 0 alone (``docker stop``, a pod's termination, ``kill``) reaches them too. Under
    SLURM every process gets the signal already; a second copy only repeats the request."""

    def __init__(self, forward_to: Callable[[], list[int]] = list) -> None:
        self.signal: int | None = None
        self._interrupts = 0
        self._previous: dict[int, object] = {}
        self._forward_to = forward_to

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if isinstance(exc, Exception):
            dead = dead_workers() or _worker_in(exc)
            if dead:  # the loader's own error is a reset connection or a pipe: name the worker instead
                raise RuntimeError(
                    f"{dead}: the out-of-memory killer sends SIGKILL (see dmesg; lower --data.num_workers "
                    "or --data.batch_size); rerun the same command to resume"
                ) from exc

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise StopSignal(signum)  # a second Ctrl-C: the user will not wait for the open shards
        first, self.signal = self.signal is None, signum
        log.warning("received %s: finishing the open shards, then stopping", signal.Signals(signum).name)
        # Ctrl-C reached the launched ranks too (a terminal signals the process group): they get SIGTERM,
        # so that this copy is not taken as the user's second Ctrl-C.
        forwarded = signal.SIGTERM if signum == signal.SIGINT else signum
        for pid in self._forward_to() if first else ():
            with suppress(ProcessLookupError):
                os.kill(pid, forwarded)

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


_WORKERS: weakref.WeakSet = weakref.WeakSet()


def watch_workers(processes: Iterable[multiprocessing.process.BaseProcess]) -> None:
    """Data workers ``dead_workers`` looks at besides this process's children (a loader that already
    shut down its workers no longer lists them there)."""
    _WORKERS.update(processes)


def _worker_in(exc: BaseException) -> str | None:
    """The worker torch's own error names (its loader may have reaped the worker already), in words."""
    found = re.search(
        r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited)", str(exc)
    )
    if found is None:
        return None
    names = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}
    how = f"killed by {names.get(found[2], found[2])}" if found[2] else "exited unexpectedly"
    return f"a data worker of this rank died (pid {found[1]}, {how})"


def dead_workers() -> str | None:
    """Which DataLoader workers of this process died of a signal or a failure, in words; None if none."""
    children = set(getattr(multiprocessing.process, "_children", set())) | set(_WORKERS)
    dead = sorted({(p.pid, p.exitcode) for p in children if p.exitcode not in (None, 0)})
    if not dead:
        return None
    told = [
        f"pid {pid}, killed by {signal.Signals(-code).name}" if code < 0 else f"pid {pid}, exit status {code}"
        for pid, code in dead
    ]
    return f"a data worker of this rank died ({'; '.join(told)})"


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
        # SIGINT is never the rank's shutdown (that is SIGTERM): a Ctrl-C of the group, even one the
        # rank itself sent with killpg, is left to the rank.
        if info.si_pid == owner_pid and info.si_signo != signal.SIGINT:
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
    # Said before asking: SLURM may end this process as soon as the requeue is accepted.
    log.warning("requeueing SLURM job %s; it resumes from the completed shards", job_id)
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    return True
