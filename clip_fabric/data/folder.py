"""A folder of images, searched recursively; a same-stem ``.txt`` file beside an image is its caption,
and a same-stem ``.json`` file its metadata.

Every entry with an image extension but a real directory is listed, so that a dangling or looping
symbolic link, or a FIFO, is a recorded error rather than a missing row. A caption or ``.json`` is read
only where its real path lies inside the source folder, since its text is copied into the metadata (a
link out of the folder could copy any file the job can read into it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from clip_fabric.config import DataArgs
from clip_fabric.data import IMAGE_EXTENSIONS, RawSample, Shard, chunk
from clip_fabric.data.meta import json_fields, text, writable

FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}  # fmt: skip


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; ``OSError`` otherwise. A FIFO or device is
    refused before a read that could block forever (opened non-blocking, then checked on the open file,
    so nothing can swap it in between)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file but {FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')}")
        return open(fd, "rb")  # O_NONBLOCK does nothing to a regular file
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them; ``OSError`` otherwise (see
    ``open_regular``; a file over ``limit`` is refused before its bytes are read)."""
    with open_regular(path) as f:
        if limit is None:
            return f.read()
        data = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)  # +1: a file that grew is seen
        if len(data) > limit:
            raise OSError(over_limit(limit, os.fstat(f.fileno()).st_size))
        return data


def over_limit(limit: int, size: int | None = None) -> str:
    held = f"{size:,} bytes" if size is not None else "more bytes"
    return f"{held} is over --data.max_image_bytes {limit:,}: not read (raise it, or null for no limit)"


def read_local(path: Path, limit: int | None = None) -> tuple[bytes | None, str | None]:
    """Bytes of a file, or the reason they cannot be had (naming the path tried)."""
    try:
        data = read_bytes(path, limit)
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        return None, f"unreadable file {writable(str(path))}: {getattr(err, 'strerror', None) or err}"
    if not data:
        return None, "empty file"
    return data, None


class FolderSource:
    def __init__(
        self,
        root: str,
        shard_size: int,
        text_only: bool = False,
        json_metadata: bool = True,
        max_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.text_only = text_only
        self.json_metadata = json_metadata
        self.shard_size = shard_size
        self.max_bytes = max_bytes
        # Sorted relative paths make the shard layout the same on every rank and every rerun. A folder
        # that cannot be listed is an entry of its own (``locked/``), recorded as its sample's error.
        self.unlisted: dict[str, str] = {}
        self.paths = sorted(self._walk())

    def _walk(self) -> Iterator[str]:
        """Every entry with an image extension that is not a real directory, relative to the root;
        a sub-folder that cannot be listed (no permission, a path past PATH_MAX) is noted in
        ``unlisted`` and the walk goes on (``Path.rglob`` drops the first silently and stops at the
        second)."""
        suffixes = {"." + ext for ext in IMAGE_EXTENSIONS}
        root = os.fspath(self.root)
        pending = [root]
        while pending:
            folder = pending.pop()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):  # links are not followed, as rglob's
                            pending.append(entry.path)
                        elif os.path.splitext(entry.name)[1].lower() in suffixes:
                            yield Path(os.path.relpath(entry.path, root)).as_posix()
            except OSError as err:
                rel = Path(os.path.relpath(folder, root)).as_posix()
                self.unlisted[f"{rel}/"] = err.strerror or str(err)
        yield from self.unlisted

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> FolderSource:
        return cls(args.source, args.shard_size, text_only, args.json_metadata, args.max_image_bytes)

    def shards(self) -> list[Shard]:
        return chunk(len(self.paths), self.shard_size, str(self.root))

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        real_root = self.root.resolve()
        for rel in self.paths[shard.start : shard.stop]:
            try:
                yield self._sample(rel, real_root)
            except Exception as err:  # noqa: BLE001 - whatever one sample raises is that sample's error
                yield RawSample(writable(rel), error=f"unreadable sample: {type(err).__name__}: {err}")

    def _sample(self, rel: str, real_root: Path) -> RawSample:
        path = self.root / rel
        sample = RawSample(writable(rel), meta={"image_path": writable(str(path))})
        if rel in self.unlisted:
            sample.error = (
                f"unreadable folder {writable(str(path))}: {self.unlisted[rel]}; its images are not listed"
            )
            return sample
        try:
            caption = self._sidecar(path.with_suffix(".txt"), real_root)
            if self.json_metadata:
                sample.meta |= self._fields(path.with_suffix(".json"), real_root)
        except (OSError, ValueError) as err:
            sample.error = writable(str(err))
            return sample
        try:
            sample.caption = text(caption, f"caption {path.with_suffix('.txt').name}") if caption else None
        except ValueError as err:  # an error only where the caption is needed (``text``, ``both``, ...)
            sample.caption_error = writable(str(err))
        if self.text_only:
            if sample.caption is None:
                sample.error = sample.caption_error or f"no caption file {path.with_suffix('.txt').name}"
        else:
            sample.image, sample.error = read_local(path, self.max_bytes)
        return sample

    def inputs(self, shard: Shard) -> list[str]:
        """Each sample's files as they are now (size and mtime of its image, ``.txt`` and ``.json``),
        for the stored plan: a done shard whose files changed since (a caption added or fixed) is
        redone by the rerun."""
        lines = []
        for rel in self.members(shard):
            path = self.root / rel
            lines.append("\t".join([rel, *(_identity(p) for p in (path, path.with_suffix(".txt"),
                                                                 path.with_suffix(".json")))]))  # fmt: skip
        return lines

    def _fields(self, path: Path, real_root: Path) -> dict[str, str | None]:
        data = self._sidecar(path, real_root)
        if data is None:
            return {}
        try:
            return json_fields(data)
        except ValueError as err:
            raise ValueError(f"metadata {path.name} unreadable: {err}") from None

    def _sidecar(self, path: Path, real_root: Path) -> bytes | None:
        """The bytes of a caption or ``.json`` beside an image; None where there is none. ``OSError``
        (naming the file) where it cannot be read or lies outside the folder."""
        if not path.is_symlink() and not path.exists():
            return None
        real = Path(os.path.realpath(path))  # a looping link stays unresolved, and fails the read
        if not real.is_relative_to(real_root):
            raise OSError(f"{path.name} links outside --data.source (to {real}): not read")
        try:
            return read_bytes(path, self.max_bytes)
        except OSError as err:
            raise OSError(f"unreadable file {path}: {err.strerror or err}") from None

    def members(self, shard: Shard) -> list[str]:
        return self.paths[shard.start : shard.stop]


def _identity(path: Path) -> str:
    try:
        stat = path.stat()
    except (OSError, ValueError):
        return "-"
    return f"{stat.st_size}:{stat.st_mtime_ns}"
