"""The run folder's one owner: what a run is (its fingerprint and shard plan), whether a rerun may resume
it, who holds it (``run_lock``), which shards are done, the summary and the exit status.

Everything is read and written through fsspec, so ``--output.dir`` may be a local path or a URL
(``file://``, ``s3://``, ``gs://``, ``memory://``, ...). A local folder gets temporary names, fsync and
rename; an object store gets whole objects, which appear complete or not at all. Done markers are
written last by the writer, so a shard without one is redone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from contextlib import AbstractContextManager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clip_fabric.reasons import describe
from clip_fabric.run_lock import hold

if TYPE_CHECKING:
    from clip_fabric.config import DataArgs, ModelArgs, OutputArgs
    from clip_fabric.data import Source

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "_lock.json"
DONE_DIR = "_done"
EMBEDDING_DIRS = {"image": "img_emb", "text": "text_emb"}
SHARD_DIRS = (*EMBEDDING_DIRS.values(), "metadata", "errors", DONE_DIR)

# Exit statuses of ``predict`` beyond 0 (every shard done, rows written), 1 (a one-line error) and
# 2 (a command-line error, jsonargparse's).
EXIT_NO_ROWS = 3
EXIT_RESUME = 75  # sysexits' EX_TEMPFAIL: shards are left; the same command resumes them

# Weights files past this size are fingerprinted by size, mtime and their first and last PARTIAL bytes:
# hashing a 10 GB checkpoint on every start (and on every rank) would cost more than the check is worth.
FULL_HASH_MAX = 64 << 20
PARTIAL = 4 << 20


def fingerprint(
    model: ModelArgs,
    data: DataArgs,
    output: OutputArgs,
    mode: str,
    precision: str,
    hub_revision: str | None = None,
) -> dict:
    """What must not change between a run and its resumption: anything that changes the rows written,
    including the contents of the checkpoint and model-config files (a file replaced at the same path
    must not mix old and new weights in one folder) and an ``hf-hub:`` repo's snapshot commit."""
    weights = model.pretrained if model.pretrained and Path(model.pretrained).is_file() else None
    # An open_clip tag names its weights by itself; an hf-hub: repo can change under its name.
    revision = {"hf_hub_revision": hub_revision} if hub_revision else None
    return {
        "model": asdict(model) | {"cache_dir": None},
        "weights": file_digest(weights) if weights else revision,
        "model_config": file_digest(model.config) if model.config else None,
        # How fast, not what: the share of JPEGs the CPU takes beside the GPU decoder changes no row.
        "data": {
            k: v
            for k, v in asdict(data).items()
            if k not in ("batch_size", "num_workers", "cpu_decode_share")
        },
        "mode": mode,
        "precision": precision,
        "dtype": output.dtype,
    }


def file_digest(path: str | os.PathLike) -> dict:
    """The contents of a file, for the fingerprint: a SHA-256 of the whole file up to FULL_HASH_MAX,
    else its size, mtime and a SHA-256 of its first and last PARTIAL bytes."""
    stat = os.stat(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= FULL_HASH_MAX:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
            return {"size": stat.st_size, "sha256": sha.hexdigest()}
        sha.update(f.read(PARTIAL))
        f.seek(-PARTIAL, os.SEEK_END)
        sha.update(f.read(PARTIAL))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_head_tail": sha.hexdigest()}


def shard_plan(source: Source) -> list[dict]:
    """Each shard's name, sample count and a digest of its members (paths, rows, tar size and mtime):
    stored on the first run so that a rerun can tell whether a shard still holds the same samples."""
    plan = []
    for shard in source.shards():
        members = source.members(shard)
        digest = hashlib.sha256("\n".join(members).encode("utf-8", "surrogateescape")).hexdigest()
        plan.append({"shard": shard.index, "name": shard.name, "samples": len(members), "digest": digest})
    return plan


class RunFolder:
    """An output folder: ``check`` in set-up, ``lock`` around the run on rank 0, ``start`` on rank 0,
    ``put`` for each file the writer makes, ``done_shards`` and ``summarize`` at the end."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, relpath: str) -> str:
        return f"{self.root.rstrip('/')}/{relpath}"

    # -- files -----------------------------------------------------------------------------------

    def put(self, relpath: str, data: bytes) -> None:
        """Atomically put ``data`` at ``relpath``: a local file is written under a temporary name,
        fsynced and renamed; a store object is written whole. A full disk is a one-line error."""
        path = self.path(relpath)
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.tmp")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            with suppress(OSError):
                os.unlink(tmp)  # no half-written temporary file is left for the rerun
            if err.errno == errno.ENOSPC:
                raise RuntimeError(
                    f"no space left on the device writing {path}: free some space and rerun the same "
                    "command to resume (the shards already done are kept)"
                ) from err
            raise

    def remove(self, relpath: str) -> None:
        path = self.path(relpath)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def read_json(self, relpath: str, what: str) -> dict | list | None:
        """A JSON file of the folder, None if absent; a damaged one is a one-line error that says what
        the file is for and what to do."""
        path = self.path(relpath)
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path} is damaged ({err}): it records {what}; pass --output.overwrite true to start "
                "again, or delete it if you are sure the settings and inputs are those of the done shards"
            ) from err

    # -- set-up ----------------------------------------------------------------------------------

    def check(self, run: dict, source: Source, overwrite: bool) -> None:
        """Refuse (one line) a rerun whose settings differ from the folder's run, or whose input moved
        samples in or out of a shard already done. Adds the current shard plan to ``run`` (``start``
        stores it). A change confined to shards not yet done is taken: they are embedded as listed now."""
        run["plan"] = shard_plan(source)
        if overwrite:
            return
        before = self.read_json(RUN_FILE, "the settings the done shards were made with")
        if before is None:
            return
        stored = before.get("fingerprint") if isinstance(before, dict) else None
        if not isinstance(stored, dict):
            raise ValueError(
                f"{self.path(RUN_FILE)} is damaged (no fingerprint): pass --output.overwrite true to "
                "start again"
            )
        current = json.loads(json.dumps(run["fingerprint"], default=str))
        if stored != current:
            keys = sorted(k for k in current.keys() | stored.keys() if stored.get(k) != current.get(k))
            raise ValueError(
                f"{self.url} holds a run with a different {', '.join(keys)}: "
                f"{'; '.join(_differences(stored, current))}. Resume it with the settings it was made with "
                "(a precision or shard size that auto resolved differently can be passed by name), "
                "choose another --output.dir, or pass --output.overwrite true to start again"
            )
        self._check_plan(run["plan"])

    def _check_plan(self, plan: list[dict]) -> None:
        stored = self.read_json(PLAN_FILE, "the shard plan of the first run")
        done = self.done_shards()
        if not done:
            return  # nothing embedded yet that a new listing could contradict
        if stored is None:
            log.warning("%s has no shard plan (an older run): the input is not checked against it", self.url)
            return
        if not isinstance(stored, list) or not all(isinstance(s, dict) and "digest" in s for s in stored):
            raise ValueError(
                f"{self.path(PLAN_FILE)} is damaged (not a shard plan): pass --output.overwrite true to "
                "start again, or delete it if you are sure the inputs are those of the done shards"
            )
        if len(stored) != len(plan):
            raise ValueError(
                f"the input now makes {len(plan)} shards where the run in {self.url} made {len(stored)} "
                f"({len(done)} done): restore the input, choose another --output.dir, or pass "
                "--output.overwrite true to start again"
            )
        moved = [s["shard"] for s, now in zip(stored, plan, strict=True) if s["digest"] != now["digest"]]
        moved_done = [i for i in moved if i in done]
        if moved_done:
            names = ", ".join(str(i) for i in moved_done[:5]) + (" ..." if len(moved_done) > 5 else "")
            raise ValueError(
                f"the input changed since the run in {self.url}: done shard(s) {names} now list other "
                "samples, so resuming would lose or repeat rows; restore the input, choose another "
                "--output.dir, or pass --output.overwrite true to start again"
            )
        if moved:
            log.warning("input changed in shards not done yet (%s): they are embedded as now listed", moved)

    def lock(self, take: bool = True) -> AbstractContextManager:
        """Hold the folder for this run (``take`` is False on every rank but 0): ``run_lock.hold``."""
        return hold(self.url, self.fs, self.path(LOCK_FILE), self.local, take)

    def start(self, run: dict, overwrite: bool) -> None:
        """Rank 0, before any shard: clear the folder if ``overwrite``, record the run and its plan."""
        if overwrite:
            for name in (*SHARD_DIRS, SUMMARY_FILE, PLAN_FILE, RUN_FILE):
                self.remove(name)
        self.fs.makedirs(self.root, exist_ok=True)
        if self.local:
            for sub in EMBEDDING_DIRS.values():  # an empty tower folder (older runs) breaks clip-retrieval
                with suppress(OSError):
                    os.rmdir(self.path(sub))
        plan = run.get("plan")
        record = {k: v for k, v in run.items() if k != "plan"}
        self.put(RUN_FILE, json.dumps(record, indent=2, default=str).encode())
        if plan is not None:
            self.put(PLAN_FILE, json.dumps(plan).encode())

    # -- progress and the end ----------------------------------------------------------------------

    def done_shards(self) -> dict[int, dict]:
        """Done records of the shards completed so far, by shard index. A damaged marker (cut, empty,
        not a record) means its shard is redone: a warning names the file."""
        done = {}
        # Object-store filesystems (s3fs, gcsfs) cache listings per process, and only the writing process
        # drops its cache: another rank's markers would stay unseen.
        self.fs.invalidate_cache(self.path(DONE_DIR))
        try:  # a listing, not a glob: the folder's own name may hold glob characters
            paths = sorted(p for p in self.fs.ls(self.path(DONE_DIR), detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return done
        for path in paths:
            if os.path.basename(path).startswith("."):
                continue
            try:
                record = json.loads(self.fs.cat_file(path))
                index = int(record["shard"])
                int(record["rows"]), int(record["errors"])
            except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
                log.warning("%s is damaged (%s: %s): its shard is redone", path, type(err).__name__, err)
                continue
            done[index] = record
        return done

    def summarize(
        self, run: dict, num_shards: int, rows: int, errors: int, seconds: float, world_size: int
    ) -> dict:
        done = self.done_shards()
        return {
            "rows": sum(r["rows"] for r in done.values()),
            "errors": sum(r["errors"] for r in done.values()),
            "filtered": sum(r.get("filtered", 0) for r in done.values()),
            "shards_done": len(done),
            "shards_total": num_shards,
            "this_run": {
                "rows": rows,
                "errors": errors,
                "seconds": round(seconds, 3),
                "samples_per_s": round(rows / seconds, 1) if seconds > 0 else None,
                "world_size": world_size,
            },
            "config": run["config"],
        }

    def write_summary(self, summary: dict) -> None:
        self.put(SUMMARY_FILE, json.dumps(summary, indent=2, default=str).encode())


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: before -> now`` for every setting that differs, nested keys dotted; long values elided."""
    out = []
    for key in sorted(before.keys() | now.keys()):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def exit_status(summary: dict) -> tuple[int, str | None]:
    """``predict``'s exit status and the line that explains a non-zero one: 0 only when every shard is
    done and rows were written (or filtered out by --threshold)."""
    total, done = summary["shards_total"], summary["shards_done"]
    if done < total:
        return EXIT_RESUME, (
            f"{total - done} of {total} shards are not done: rerun the same command to resume "
            f"(exit status {EXIT_RESUME})"
        )
    if total == 0:
        return EXIT_NO_ROWS, "the input holds no samples: nothing was embedded (check --data.source)"
    if summary["rows"] == 0 and not summary.get("filtered"):
        return EXIT_NO_ROWS, (
            f"every sample failed ({summary['errors']} recorded in errors/"
            + (f": {describe(summary['error_reasons'])}" if summary.get("error_reasons") else "")
            + "): nothing was embedded"
        )
    return 0, None
