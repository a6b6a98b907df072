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
from clip_fabric.data.meta import json_fields, text

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


def read_bytes(path: Path) -> bytes:
    """The bytes of the regular file at ``path``; ``OSError`` otherwise (see ``open_regular``)."""
    with open_regular(path) as f:
        return f.read()


def read_local(path: Path) -> tuple[bytes | None, str | None]:
    """Bytes of a file, or the reason they cannot be had (naming the path tried)."""
    try:
        data = read_bytes(path)
    except OSError as err:
        return None, f"unreadable file {path}: {err.strerror or err}"
    if not data:
        return None, "empty file"
    return data, None


class FolderSource:
    def __init__(
        self, root: str, shard_size: int, text_only: bool = False, json_metadata: bool = True
    ) -> None:
        self.root = Path(root)
        self.text_only = text_only
        self.json_metadata = json_metadata
        self.shard_size = shard_size
        suffixes = {"." + ext for ext in IMAGE_EXTENSIONS}
        # Sorted relative paths make the shard layout the same on every rank and every rerun.
        self.paths = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower() in suffixes and (p.is_symlink() or not p.is_dir())
        )

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> FolderSource:
        return cls(args.source, args.shard_size, text_only, args.json_metadata)

    def shards(self) -> list[Shard]:
        return chunk(len(self.paths), self.shard_size, str(self.root))

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        real_root = self.root.resolve()
        for rel in self.paths[shard.start : shard.stop]:
            path = self.root / rel
            sample = RawSample(rel, meta={"image_path": str(path)})
            try:
                caption = self._sidecar(path.with_suffix(".txt"), real_root)
                sample.caption = (
                    text(caption, f"caption {path.with_suffix('.txt').name}") if caption else None
                )
                if self.json_metadata:
                    sample.meta |= self._fields(path.with_suffix(".json"), real_root)
            except (OSError, ValueError) as err:
                sample.error = str(err)
                yield sample
                continue
            if self.text_only:
                if sample.caption is None:
                    sample.error = f"no caption file {path.with_suffix('.txt').name}"
            else:
                sample.image, sample.error = read_local(path)
            yield sample

    def _fields(self, path: Path, real_root: Path) -> dict[str, str | None]:
        data = self._sidecar(path, real_root)
        if data is None:
            return {}
        try:
            return json_fields(data)
        except ValueError as err:
            raise ValueError(f"metadata {path.name} unreadable: {err}") from None

    @staticmethod
    def _sidecar(path: Path, real_root: Path) -> bytes | None:
        """The bytes of a caption or ``.json`` beside an image; None where there is none. ``OSError``
        (naming the file) where it cannot be read or lies outside the folder."""
        if not path.is_symlink() and not path.exists():
            return None
        real = Path(os.path.realpath(path))  # a looping link stays unresolved, and fails the read
        if not real.is_relative_to(real_root):
            raise OSError(f"{path.name} links outside --data.source (to {real}): not read")
        try:
            return read_bytes(path)
        except OSError as err:
            raise OSError(f"unreadable file {path}: {err.strerror or err}") from None

    def members(self, shard: Shard) -> list[str]:
        return self.paths[shard.start : shard.stop]
