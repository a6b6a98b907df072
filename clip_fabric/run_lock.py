"""Who holds an output folder: one run at a time. A local folder is held with ``flock`` on its lock file
(freed by the kernel when the holder dies); an object store, which has no locks, with a lock object
written and read back (best effort). The lock file names the holder's host and PID for the message a
second run gets."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import fsspec

log = logging.getLogger(__name__)


@contextmanager
def hold(
    url: str, fs: fsspec.AbstractFileSystem, path: str, local: bool, take: bool = True
) -> Iterator[None]:
    """Hold the folder for this run (``take`` is False on every rank but 0). A folder held by a live
    run is refused with a one-line error naming its host and PID; a lock left by a dead process is
    taken over. Local folders use ``flock`` (freed by the kernel when the holder dies, on any
    host that shares the file system's locks); object stores a lock object, best effort."""
    if not take:
        yield
        return
    release = _flock(url, path) if local else None
    if release is None:
        release = _lock_object(url, fs, path)
    try:
        yield
    finally:
        release()


def _flock(url: str, path: str) -> Callable[[], None] | None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        try:  # never through a link: one planted at the lock's name would have its target overwritten
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            log.warning("%s: %s is a symbolic link, not a lock: removed", url, path)
            os.unlink(path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(_busy(url, _read_holder(path, retries=20))) from None
        except OSError:  # a file system without flock: fall back to a lock file
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released (removed) the file between our open and our flock
    left = _read_holder(path)
    if left:
        log.warning("%s: taking over the lock left by %s, which is gone", url, _describe(left))
    with suppress(OSError):  # the holder's name is for messages only: a full disk must not stop here
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)

    def release() -> None:
        with suppress(FileNotFoundError):
            os.unlink(path)  # before unlocking: a run that opened it meanwhile sees another inode
        os.close(fd)

    return release


def _lock_object(url: str, fs: fsspec.AbstractFileSystem, path: str) -> Callable[[], None]:
    """A lock object for stores without flock: check, write, read back. Not atomic: two runs that
    start within the store's write latency may both proceed (docs/reliability.md)."""
    if fs.exists(path):
        holder = _read_store_holder(fs, path)
        if holder and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            log.warning("%s: taking over the lock left by %s, which is gone", url, _describe(holder))
        else:
            raise RuntimeError(_busy(url, holder, path))
    mine = json.dumps(_holder() | {"token": uuid.uuid4().hex}).encode()
    fs.pipe_file(path, mine)
    if fs.cat_file(path) != mine:
        raise RuntimeError(_busy(url, _read_store_holder(fs, path), path))

    def release() -> None:
        if fs.exists(path) and fs.cat_file(path) == mine:
            fs.rm(path)

    return release


def _busy(url: str, holder: dict | None, stale_path: str | None = None) -> str:
    hint = f"; if that run is dead (another host), delete {stale_path}" if stale_path else ""
    return (
        f"{url} is in use by another run ({_describe(holder)}): wait for it to end, "
        f"or choose another --output.dir{hint}"
    )


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def _read_holder(path: str, retries: int = 0) -> dict | None:
    """The holder a local lock file names; the winner of a race writes it just after its flock."""
    for attempt in range(retries + 1):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                holder = json.loads(f.read(1 << 16))
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        if attempt < retries:
            time.sleep(0.05)
    return None


def _read_store_holder(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        holder = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
