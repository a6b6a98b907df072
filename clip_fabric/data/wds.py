"""WebDataset tar shards (local paths, brace patterns, URLs or ``pipe:`` commands): one tar, one shard.

Tars are read with webdataset's own tar iterator; the split across ranks and workers is ours so that
a shard's index, and so its output file, is the same on every run whatever the world size.

A name is run as a shell command only where the user wrote ``pipe:`` in ``--data.source``: tar files
found by listing a folder are always opened as files, whatever their names.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import braceexpand
from webdataset import tariterators
from webdataset.gopen import gopen

from clip_fabric.config import DataArgs
from clip_fabric.data import IMAGE_EXTENSIONS, RawSample, Shard
from clip_fabric.data.folder import open_regular
from clip_fabric.data.meta import json_fields, text, writable

CAPTION_FIELDS = ("txt", "caption", "text")
# Magic numbers of the compressions tarfile's stream mode undoes (gzip, bzip2, xz): a compressed tar
# is not whole 512-byte blocks, and a cut in it is the decompressor's error to report, not ours.
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def expand_urls(source: str) -> list[str]:
    """Tar URLs of ``source``: a folder's ``*.tar`` files, or the brace expansion of a pattern."""
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    else:
        urls = [url for part in source.split("::") for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"--data.source {source!r} names no tar shards")
    return urls


class WebDatasetSource:
    def __init__(
        self,
        urls: list[str],
        text_only: bool = False,
        image_key: str | None = None,
        caption_key: str | None = None,
        json_metadata: bool = True,
        listed: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self.urls = urls
        self.max_bytes = max_bytes  # a member over it is not read (its header gives its size)
        self.text_only = text_only
        self.image_keys = (image_key,) if image_key else IMAGE_EXTENSIONS
        self.caption_keys = (caption_key,) if caption_key else CAPTION_FIELDS
        self.json_metadata = json_metadata
        self.listed = listed  # names found by listing a folder: files, whatever they look like

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> WebDatasetSource:
        urls = expand_urls(args.source)
        listed = Path(args.source).is_dir()
        missing = [u for u in urls if _is_file_name(u, listed) and not Path(u).is_file()]
        if len(missing) == len(urls):
            raise ValueError(f"--data.source {args.source!r}: none of its {len(urls)} tar files exists")
        return cls(
            urls,
            text_only,
            args.image_key,
            args.caption_key,
            args.json_metadata,
            listed,
            args.max_image_bytes,
        )

    def shards(self) -> list[Shard]:
        return [Shard(i, url) for i, url in enumerate(self.urls)]

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        # Grouping files into samples is done here rather than by webdataset's group_by_keys so that a
        # read error still hands over the sample gathered before it.
        count, current = 0, None
        try:
            with self._open(shard.name) as stream:
                for file in _members(stream, self.max_bytes):
                    key, ext = tariterators.base_plus_ext(file.get("fname", ""))
                    if key is None:
                        continue
                    if current is not None and current["__key__"] != key:
                        count += 1
                        yield self._safe_raw(current)
                        current = None
                    current = current or {"__key__": key}
                    ext = ext.lower()
                    if ext in current:  # tar keeps both; which one is the sample's cannot be told
                        current.setdefault("__duplicates__", []).append(f"{key}.{ext}")
                    if file["data"] is None:
                        current.setdefault("__too_big__", {})[ext] = f"{key}.{ext} ({file['size']:,} bytes)"
                    current[ext] = file["data"] or b""
            if _is_file_name(shard.name, self.listed):
                _check_tar_size(Path(shard.name))
        except Exception as err:  # noqa: BLE001 - a broken tar keeps the samples read before the break
            if current is not None:
                count += 1
                yield self._safe_raw(current)
                current = None
            yield RawSample(
                writable(f"{Path(shard.name).name}#{count}"),
                error=writable(f"tar shard unreadable after {count} samples: {type(err).__name__}: {err}"),
            )
        if current is not None:
            yield self._safe_raw(current)

    @contextmanager
    def _open(self, url: str) -> Iterator[BinaryIO]:
        """The tar's bytes: a local file opened as one, never handed to ``gopen`` (which would run a
        name starting with ``pipe:`` as a command); URLs and the user's own ``pipe:`` through it."""
        if _is_file_name(url, self.listed):
            with open_regular(Path(url)) as f:  # a FIFO named .tar would block the worker forever
                yield f
            return
        stream = gopen(url)
        try:
            yield stream
        finally:
            stream.close()

    def _safe_raw(self, sample: dict) -> RawSample:
        """``_raw``, where anything it raises is that sample's error, not the tar's."""
        try:
            return self._raw(sample)
        except Exception as err:  # noqa: BLE001 - one sample's bytes must not lose the rest of the tar
            key = writable(sample["__key__"])
            return RawSample(key, error=f"unreadable sample: {type(err).__name__}: {writable(str(err))}")

    def _raw(self, sample: dict) -> RawSample:
        key = writable(sample["__key__"])  # a member name that is not UTF-8, escaped
        raw = RawSample(key, meta={"image_path": key})
        try:
            raw.meta |= self._fields(sample)
        except ValueError as err:
            raw.error = writable(str(err))
            return raw
        field = next((f for f in self.caption_keys if f in sample), None)
        try:
            raw.caption = text(sample[field], f"caption {raw.key}.{field}") if field else None
        except ValueError as err:  # an error only where the caption is needed (``text``, ``both``, ...)
            raw.caption_error = str(err)
        # A member over the cap fails the sample only where it is one the sample is read for: its image
        # (not in text mode), its caption or its .json; a large .mp4 or .npy beside them is left unread.
        needed = {field, "json", *(() if self.text_only else self.image_keys)}
        too_big = [name for ext, name in sample.get("__too_big__", {}).items() if ext in needed]
        if too_big:
            raw.error = writable(
                f"tar member {', '.join(too_big)} is over --data.max_image_bytes "
                f"{self.max_bytes:,}: not read (raise it, or null for no limit)"
            )
            return raw
        if "__duplicates__" in sample:
            raw.error = writable(f"the tar holds {', '.join(sample['__duplicates__'])} more than once")
            return raw
        if self.text_only:
            if raw.caption is None:
                raw.error = raw.caption_error or f"no caption field ({'/'.join(self.caption_keys)}) in sample"
            return raw
        ext = next((e for e in self.image_keys if e in sample), None)
        if ext is None:
            raw.error = f"no image field ({'/'.join(self.image_keys)}) in sample"
        elif not sample[ext]:
            raw.error = "empty file"
        else:
            raw.image = sample[ext]
        return raw

    def _fields(self, sample: dict) -> dict[str, str | None]:
        """The sample's ``.json`` fields (when asked for) and class label; ``ValueError`` if unreadable."""
        fields = {}
        if self.json_metadata and "json" in sample:
            try:
                fields = json_fields(sample["json"])
            except ValueError as err:
                raise ValueError(f"metadata {writable(sample['__key__'])}.json unreadable: {err}") from None
        if "cls" in sample:  # the class index of a labelled sample, for zero-shot evaluation; bytes that
            # are not UTF-8 are escaped (``evaluate`` names the bad label; ``image`` mode does not need it)
            fields["label"] = writable(sample["cls"].decode("utf-8", "surrogateescape").strip())
        return fields

    def members(self, shard: Shard) -> list[str]:
        """The tar's URL, and its size and mtime when it is a local file (a tar rewritten in place)."""
        if "://" in shard.name or shard.name.startswith("pipe:"):
            return [shard.name]
        try:
            stat = Path(shard.name).stat()
        except OSError:
            return [shard.name, "missing"]
        return [shard.name, str(stat.st_size), str(stat.st_mtime_ns)]


def _members(stream: BinaryIO, limit: int | None) -> Iterator[dict]:
    """The tar's regular files as webdataset's ``tar_file_iterator`` yields them (``fname``, ``data``;
    its ``__meta__`` members skipped), except that a member over ``limit`` bytes is not read: its
    ``data`` is None and ``size`` says how large its header claims it is."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            name = info.name
            if not info.isreg() or re.match(r"__[^/]*__($|/)", name):
                continue
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue
            if limit is not None and info.size > limit:
                yield {"fname": name, "data": None, "size": info.size}
            else:
                yield {"fname": name, "data": tar.extractfile(info).read()}
            tar.members = []  # a stream's members are not kept: memory stays flat over a long tar


def _is_file_name(url: str, listed: bool) -> bool:
    """Whether ``url`` is a local path: any name found by listing, and written ones with no scheme."""
    return listed or ("://" not in url and not url.startswith("pipe:"))


def _check_tar_size(path: Path) -> None:
    """Tar files are whole 512-byte blocks: anything else was cut, maybe inside a header that tarfile
    reads as a clean end of archive. A compressed tar is not blocks; a cut in it is the decompressor's
    error, raised while reading."""
    with open(path, "rb") as f:
        if f.read(6).startswith(COMPRESSED_MAGIC):
            return
    size = path.stat().st_size
    if size % 512:
        raise OSError(f"{size} bytes is not a whole number of 512-byte tar blocks")
