"""Output shards in clip-retrieval's layout, written atomically, one per input shard, off the main thread.

For input shard N (zero-padded to the width of the shard count) a complete output is::

    img_emb/img_emb_N.npy   text_emb/text_emb_N.npy   metadata/metadata_N.parquet
    errors/errors_N.parquet (only if some samples failed)   _done/N.json (written last)

Only the folders of what a mode writes exist (an empty ``text_emb/`` makes clip-retrieval's index
fail). Every file is put whole through the run folder (a temporary name renamed into place on a local
disk, a whole object on a store), and ``_done/N.json`` goes last, so a shard either has its done marker
and all its files, or it is redone on the next run.
"""

from __future__ import annotations

import io
import json
import os
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_fabric.data.meta import writable
from clip_fabric.modes import Finished
from clip_fabric.run_folder import DONE_DIR, EMBEDDING_DIRS, RunFolder

__all__ = ["DONE_DIR", "EMBEDDING_DIRS", "ShardWriter", "done_shards", "shard_name"]


@dataclass
class _ShardRows:
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    filtered: int = 0
    embeddings: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))


def shard_name(index: int, num_shards: int) -> str:
    return f"{index:0{len(str(max(num_shards - 1, 0)))}d}"


def done_shards(out_dir: str | os.PathLike) -> dict[int, dict]:
    """Done records of the shards completed in ``out_dir`` (a path or URL) so far, by shard index."""
    return RunFolder(out_dir).done_shards()


class ShardWriter:
    """Collects a shard's batches and writes the shard when its last batch arrives."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        num_shards: int,
        dtype: str = "float16",
        enabled: bool = True,
    ) -> None:
        self.folder = RunFolder(out_dir)  # a path or an fsspec URL
        self.enabled = enabled  # a rank whose group-mate writes the same rows keeps only the bookkeeping
        self.num_shards = num_shards
        self.dtype = np.dtype(dtype)
        self._open: dict[int, _ShardRows] = defaultdict(_ShardRows)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._writes: list[Future] = []
        self._failed = False  # after a failed write (a full disk) the queued shards are left for the rerun

    def add(self, shard: int, source: str, finished: Finished, errors: list[dict], last: bool) -> None:
        """Add one batch to its shard: its finished rows and embeddings (``clip_fabric.modes``) and the
        errors of its samples; the shard is written when its ``last`` batch arrives."""
        buffer = self._open[shard]
        buffer.rows.extend(finished.rows)
        buffer.errors.extend(errors)
        buffer.filtered += finished.filtered
        for tower, array in finished.embeddings.items():
            buffer.embeddings[tower].append(array.astype(self.dtype, copy=False))
        if last:
            self._writes.append(self._pool.submit(self._write, shard, source, self._open.pop(shard)))
            self._raise_failed()

    @property
    def open_shards(self) -> set[int]:
        """Shards that have received batches but not yet their last one."""
        return set(self._open)

    def close(self) -> None:
        """Wait for the pending writes; re-raise the first that failed."""
        self._pool.shutdown(wait=True)
        self._raise_failed()
        if self._open:
            raise RuntimeError(f"shards {sorted(self._open)} never received their last batch")

    def _raise_failed(self) -> None:
        for future in [f for f in self._writes if f.done()]:
            future.result()
            self._writes.remove(future)

    def _write(self, shard: int, source: str, buffer: _ShardRows) -> None:
        if not self.enabled or self._failed:
            return
        try:
            self._put_shard(shard, source, buffer)
        except BaseException:
            self._failed = True
            raise

    def _put_shard(self, shard: int, source: str, buffer: _ShardRows) -> None:
        name = shard_name(shard, self.num_shards)
        files = {}  # each file's size, in the done marker: a file cut or replaced behind it is seen
        for tower, sub in EMBEDDING_DIRS.items():
            # A shard whose rows were all filtered (--threshold) has no metadata file: no embedding files
            # either, or readers that pair them (embedding-reader) trip on zero-row arrays.
            arrays = buffer.embeddings.get(tower) if buffer.rows else None
            files[f"{sub}/{sub}_{name}.npy"] = np.concatenate(arrays) if arrays else None
        files[f"metadata/metadata_{name}.parquet"] = _table(buffer.rows)
        files[f"errors/errors_{name}.parquet"] = _table(buffer.errors)
        sizes = {relpath: self._replace(relpath, content) for relpath, content in files.items()}
        record = {
            "shard": shard,
            "source": source,
            "rows": len(buffer.rows),
            "errors": len(buffer.errors),
            "filtered": buffer.filtered,
            "files": {relpath: size for relpath, size in sizes.items() if size is not None},
        }
        self._replace(f"{DONE_DIR}/{name}.json", record)

    def _replace(self, relpath: str, content: np.ndarray | pa.Table | dict | None) -> int | None:
        """Atomically put ``content`` at ``relpath`` and return its size; ``None`` removes what an
        interrupted run left there."""
        if content is None:
            self.folder.remove(relpath)
            return None
        buf = io.BytesIO()
        if isinstance(content, np.ndarray):
            np.save(buf, content)
        elif isinstance(content, pa.Table):
            pq.write_table(content, buf)
        else:
            buf.write(json.dumps(content).encode())
        self.folder.put(relpath, buf.getvalue())
        return buf.tell()


def _table(rows: list[dict]) -> pa.Table | None:
    """Rows as a table; text columns are strings even when all null (one schema for every shard). No rows
    gives no file, since zero-row files trip readers such as embedding-reader."""
    if not rows:
        return None
    names = dict.fromkeys(name for row in rows for name in row)  # every row's columns (.json fields differ)
    columns = {writable(name): [row.get(name) for row in rows] for name in names}
    return pa.table({name: _array(values) for name, values in columns.items()})


def _array(values: list) -> pa.Array:
    kind = _column_type(next((v for v in values if v is not None), None))
    try:
        return pa.array(values, kind)
    except UnicodeEncodeError:  # text the sources did not escape (a tar file's own name): escaped here
        return pa.array([writable(v) if isinstance(v, str) else v for v in values], kind)


def _column_type(value: object) -> pa.DataType:
    if isinstance(value, float):
        return pa.float32()
    if isinstance(value, list):
        return pa.list_(pa.float32() if value and isinstance(value[0], float) else pa.string())
    return pa.string()
