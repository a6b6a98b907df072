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
import re
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
        entry = {"shard": shard.index, "name": shard.name, "samples": len(members)}
        entry["digest"] = _digest(members)
        if hasattr(source, "inputs"):  # the files each sample reads (a folder's images and sidecars)
            entry["inputs"] = _digest(source.inputs(shard))
        plan.append(entry)
    return plan


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


class RunFolder:
    """An output folder: ``check`` in set-up, ``lock`` around the run on rank 0, ``start`` on rank 0,
    ``put`` for each file the writer makes, ``done_shards`` and ``summarize`` at the end."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url)
        if "://" in self.url:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        else:  # a local path is a path: fsspec would read ``a::b`` as a chain of URLs
            self.fs, self.root = LocalFileSystem(), os.path.abspath(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.stale: list[int] = []  # done shards whose input files changed since: redone (``check``)

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
            with suppress(FileNotFoundError):
                os.unlink(tmp)  # a link planted at the temporary name is removed, never written through
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(tmp, flags, 0o644), "wb") as f:
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
        self._refuse_foreign()
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

    def _refuse_foreign(self) -> None:
        """A folder that holds what a run writes (``metadata/``, ``summary.json``, ...) but no
        ``run.json`` is not a run's: nothing in it may be replaced, or deleted by ``--output.overwrite``."""
        try:
            names = {os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            return
        ours = sorted(names & {*SHARD_DIRS, SUMMARY_FILE, PLAN_FILE})
        if ours and RUN_FILE not in names:
            raise ValueError(
                f"--output.dir {self.url} holds {', '.join(ours)} but no {RUN_FILE}: it is not a clip_fabric "
                "run folder, and a run would replace (or --output.overwrite delete) those files; choose "
                "another --output.dir"
            )

    def _check_plan(self, plan: list[dict]) -> None:
        stored = self.read_json(PLAN_FILE, "the shard plan of the first run")
        done = self.done_shards()
        if not done:
            return  # nothing embedded yet that a new listing could contradict
        if stored is None:
            log.warning("%s has no shard plan (an older run): the input is not checked against it", self.url)
            return
        if not _is_plan(stored) or max(done) >= len(stored):
            raise ValueError(
                f"{self.path(PLAN_FILE)} is damaged (not the shard plan of the done shards): pass "
                "--output.overwrite true to start again, or delete it if you are sure the inputs are "
                "those of the done shards"
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
        self.stale = [
            s["shard"]
            for s, now in zip(stored, plan, strict=True)
            if s["shard"] in done and "inputs" in s and s["inputs"] != now.get("inputs", s["inputs"])
        ]
        if self.stale:
            names = ", ".join(str(i) for i in self.stale[:10]) + (" ..." if len(self.stale) > 10 else "")
            log.warning(
                "%s: done shard(s) %s read input files (images, captions, .json) that changed since: "
                "they are redone",
                self.url,
                names,
            )

    def lock(self, take: bool = True) -> AbstractContextManager:
        """Hold the folder for this run (``take`` is False on every rank but 0): ``run_lock.hold``."""
        return hold(self.url, self.fs, self.path(LOCK_FILE), self.local, take)

    def start(self, run: dict, overwrite: bool) -> None:
        """Rank 0, before any shard: clear the folder if ``overwrite``, record the run and its plan."""
        if overwrite:
            for name in (*SHARD_DIRS, SUMMARY_FILE, PLAN_FILE, RUN_FILE):
                self.remove(name)
        self.fs.makedirs(self.root, exist_ok=True)
        for index, path in self._marker_paths().items():
            if index in self.stale:  # before the new plan: a stop from here on still redoes them
                self.fs.rm(path)
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

    def _marker_paths(self) -> dict[int, str]:
        """The done markers' paths by the shard index their names give (a listing, not a glob: the
        folder's own name may hold glob characters)."""
        # Object-store filesystems (s3fs, gcsfs) cache listings per process, and only the writing process
        # drops its cache: another rank's markers would stay unseen.
        self.fs.invalidate_cache(self.path(DONE_DIR))
        try:
            paths = self.fs.ls(self.path(DONE_DIR), detail=False)
        except FileNotFoundError:
            return {}
        names = {os.path.basename(p): p for p in paths}
        return {int(n[:-5]): names[n] for n in sorted(names) if re.fullmatch(r"[0-9]+\.json", n)}

    def _sizes(self) -> dict[str, int]:
        """The size of each shard file, by its path in the folder (one listing per sub-folder)."""
        sizes = {}
        for sub in (*EMBEDDING_DIRS.values(), "metadata", "errors"):
            self.fs.invalidate_cache(self.path(sub))
            with suppress(FileNotFoundError, NotADirectoryError):
                for entry in self.fs.ls(self.path(sub), detail=True):
                    sizes[f"{sub}/{os.path.basename(entry['name'])}"] = entry.get("size")
        return sizes

    def done_shards(self) -> dict[int, dict]:
        """Done records of the shards completed so far, by shard index. A damaged marker (cut, empty,
        not a record, counts that are not counts), or one whose shard files are not the sizes it
        records (cut or replaced behind it), means its shard is redone: a warning names the file."""
        done, sizes = {}, None
        for index, path in self._marker_paths().items():
            try:
                record = json.loads(self.fs.cat_file(path))
                problem = _marker_problem(record, index)
            except FileNotFoundError:  # removed since the listing (rank 0 redoing a stale shard)
                continue
            except (ValueError, UnicodeDecodeError) as err:
                problem = f"{type(err).__name__}: {err}"
            if problem is None and isinstance(record.get("files"), dict):
                sizes = self._sizes() if sizes is None else sizes
                wrong = sorted(f for f, size in record["files"].items() if sizes.get(f) != size)
                problem = f"{', '.join(wrong)} not as written" if wrong else None
            if problem is not None:
                log.warning("%s is damaged (%s): its shard is redone", path, problem)
                continue
            done[index] = record
        return done

    def summarize(
        self, run: dict, num_shards: int, rows: int, errors: int, seconds: float, world_size: int
    ) -> dict:
        done = self.done_shards()
        if len(done) == num_shards and pad_metadata(self, done):
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


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _marker_problem(record: object, index: int) -> str | None:
    """What is wrong with a done marker's record, None if nothing."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    for key in ("shard", "rows", "errors", "filtered"):
        if (key in record or key != "filtered") and not _is_count(record.get(key)):
            return f"{key} is {record.get(key)!r}, not a count"
    if record["shard"] != index:
        return f"it names shard {record['shard']}"
    files = record.get("files")
    if files is not None and not (
        isinstance(files, dict) and all(isinstance(k, str) and _is_count(v) for k, v in files.items())
    ):
        return "its files are not a record of sizes"
    return None


def _is_plan(stored: object) -> bool:
    return isinstance(stored, list) and all(
        isinstance(s, dict) and s.get("shard") == i and isinstance(s.get("digest"), str)
        for i, s in enumerate(stored)
    )


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


def pad_metadata(folder: RunFolder, done: dict[int, dict]) -> bool:
    """Give every metadata file of a finished run the same columns: a ``.json`` field absent from a
    whole shard is added there as nulls, since readers that take a folder's schema from one file
    (embedding-reader) cannot read the column otherwise. A padded file's done marker records its new
    size (a crash between the two only makes that shard redone). True if any file was padded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(f for f in folder._sizes() if re.fullmatch(r"metadata/metadata_[0-9]+\.parquet", f))
    schemas = {}
    for relpath in files:  # the done shards' files only: another's may be half written or foreign
        if int(relpath[len("metadata/metadata_") : -len(".parquet")]) not in done:
            continue
        try:
            with folder.fs.open(folder.path(relpath), "rb") as f:
                schemas[relpath] = pq.read_schema(f)
        except Exception as err:  # noqa: BLE001 - an unreadable file is not padded; the summary goes on
            log.warning("metadata columns: %s is unreadable (%s); not padded", relpath, err)
    columns = {field.name: field.type for schema in schemas.values() for field in schema}
    padded = False
    for relpath, schema in schemas.items():
        missing = [name for name in columns if name not in schema.names]
        index = int(relpath[len("metadata/metadata_") : -len(".parquet")])
        if not missing or index not in done:
            continue
        with folder.fs.open(folder.path(relpath), "rb") as f:
            table = pq.read_table(f)
        for name in missing:
            table = table.append_column(name, pa.nulls(len(table), columns[name]))
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        folder.put(relpath, data)
        record = done[index]
        if isinstance(record.get("files"), dict):
            record["files"][relpath] = len(data)
            name = relpath[len("metadata/metadata_") : -len(".parquet")]
            folder.put(f"{DONE_DIR}/{name}.json", json.dumps(record).encode())
        padded = True
    return padded
