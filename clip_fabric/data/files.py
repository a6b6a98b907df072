"""A list of images (and/or captions) in a CSV, TSV, parquet or plain-text file.

Paths are read from disk, a relative one against the folder of the list (not the working directory), and
so is a ``file://`` URL (with the same checks: a FIFO or device is refused, not read); anything with
another scheme (``http://``, ``s3://``, ...) is read through fsspec. Every read stops at
``--data.max_image_bytes``. A listed name is never run as a command: ``pipe:...`` in a list is a file name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clip_fabric.config import DataArgs
from clip_fabric.data import RawSample, Shard, chunk
from clip_fabric.data.folder import over_limit, read_local

IMAGE_COLUMNS = ("image_path", "path", "filepath", "url", "image")
CAPTION_COLUMNS = ("caption", "text", "title")
URL_TIMEOUT_S = 30


def read_url(url: str, limit: int | None = None) -> tuple[bytes | None, str | None]:
    """The bytes at ``url``, at most ``limit`` of them (an endless body is cut there, not held whole),
    or the reason they cannot be had."""
    try:
        with fsspec.open(url, "rb", timeout=URL_TIMEOUT_S) as f:
            size = getattr(f, "size", None)
            if limit is not None and isinstance(size, int) and size > limit:
                return None, f"unreadable url {url}: {over_limit(limit, size)}"
            data = f.read() if limit is None else _read_at_most(f, limit + 1)
    except Exception as err:  # noqa: BLE001 - any failure of a remote read is a per-sample error
        return None, f"unreadable url {url}: {type(err).__name__}: {err}"
    if limit is not None and len(data) > limit:
        return None, f"unreadable url {url}: {over_limit(limit)}"
    return (data, None) if data else (None, "empty file")


def _read_at_most(f: BinaryIO, count: int) -> bytes:
    """Up to ``count`` bytes of ``f``: a stream's read may return fewer than asked before its end."""
    data = bytearray()
    while len(data) < count:
        block = f.read(count - len(data))
        if not block:
            break
        data += block
    return bytes(data)


class FileListSource:
    """Rows of a list. ``images``/``captions`` hold each row's path and caption as text (a numeric
    caption column as Python's ``str`` of each value: ``7``, ``3.5``; NaN as none); a value that is not
    UTF-8 text is None there and its reason in ``bad``, recorded as that row's error."""

    def __init__(
        self,
        path: str,
        shard_size: int,
        image_column: str | None = None,
        caption_column: str | None = None,
        text_only: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.shard_size = shard_size
        self.max_bytes = max_bytes
        columns = _read_table(self.path, "caption" if text_only else "image_path")
        images = _pick(columns, image_column, IMAGE_COLUMNS, "--data.image_column")
        captions = _pick(columns, caption_column, CAPTION_COLUMNS, "--data.caption_column")
        # Text mode reads no image, even where the list has paths; their paths still go to the metadata.
        listed = images if text_only else None
        if text_only:
            images = None
            if captions is None:
                raise ValueError(
                    f"{path}: no caption column ({'/'.join(CAPTION_COLUMNS)}) for --mode text; name it "
                    f"with --data.caption_column (columns: {', '.join(columns) or 'none'})"
                )
        elif images is None:
            raise ValueError(
                f"{path}: no image column ({'/'.join(IMAGE_COLUMNS)}); name it with --data.image_column "
                f"(columns: {', '.join(columns) or 'none'}), or embed captions alone with --mode text"
            )
        self.bad: dict[int, str] = {}
        self.images = self._texts(images[1], images[0]) if images else None
        self.captions = self._texts(captions[1], captions[0]) if captions else None
        if self.images is not None and self.images and not any(self.images):
            raise ValueError(
                f"{path}: column {images[0]!r} holds no path in any of its {len(self.images)} rows; "
                "name the path column with --data.image_column"
            )
        self.count = len(self.images if self.images is not None else self.captions)
        self.paths = [_listed_path(v) for v in listed[1]] if listed else None

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> FileListSource:
        return cls(
            args.source, args.shard_size, args.image_column, args.caption_column, text_only,
            args.max_image_bytes,
        )  # fmt: skip

    def shards(self) -> list[Shard]:
        return chunk(self.count, self.shard_size, str(self.path))

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        width = max(len(str(self.count - 1)), 9)
        for row in range(shard.start, shard.stop):
            try:
                yield self._sample(row, width)
            except Exception as err:  # noqa: BLE001 - whatever one row raises is that row's error
                yield RawSample(
                    f"{row:0{width}d}", error=f"row {row} unreadable: {type(err).__name__}: {err}"
                )

    def _sample(self, row: int, width: int) -> RawSample:
        caption = self.captions[row] if self.captions is not None else None
        sample = RawSample(f"{row:0{width}d}", caption=caption)
        if self.images is not None:
            location = self.images[row]
            # As a folder's: absolute, so the metadata still finds the image from anywhere.
            sample.meta["image_path"] = (
                location if not location or "://" in location else str(self.resolve(location))
            )
            if row in self.bad:
                sample.error = self.bad[row]
            elif not location:
                sample.error = "empty image path"
            elif location.startswith("file://"):  # a local file, with a local file's checks
                sample.image, sample.error = read_local(
                    self.resolve(location[len("file://") :]), self.max_bytes
                )
            elif "://" in location:
                sample.image, sample.error = read_url(location, self.max_bytes)
            else:
                sample.image, sample.error = read_local(self.resolve(location), self.max_bytes)
        elif row in self.bad:
            sample.error = self.bad[row]
        if self.paths is not None and self.paths[row]:
            location = self.paths[row]
            sample.meta["image_path"] = location if "://" in location else str(self.resolve(location))
        return sample

    def resolve(self, location: str) -> Path:
        """Where a listed path is read: an absolute one as it is, a relative one against the folder
        of the list (not the working directory), so a list and its images move together."""
        path = Path(location)
        return path if path.is_absolute() else (self.path.parent / path).absolute()

    def _texts(self, values: list, column: str) -> list[str | None]:
        texts = []
        for row, value in enumerate(values):
            try:
                texts.append(_cell(value))
            except ValueError as err:
                texts.append(None)
                self.bad.setdefault(row, f"row {row}, column {column!r}: {err}")
        return texts

    def members(self, shard: Shard) -> list[str]:
        images = self.images[shard.start : shard.stop] if self.images is not None else None
        captions = self.captions[shard.start : shard.stop] if self.captions is not None else None
        return [
            f"{images[i] if images is not None else ''}\t{captions[i] if captions is not None else ''}"
            for i in range(shard.stop - shard.start)
        ]


def _cell(value: object) -> str | None:
    """A list's value as text; ``ValueError`` for bytes that are not UTF-8."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    return value if isinstance(value, str) else str(value)


def _read_table(path: Path, line_column: str) -> dict[str, list]:
    """Columns of the list; a ``.txt`` list is one ``line_column`` value per non-empty line. Text is
    read as bytes and decoded per row, so one row that is not UTF-8 is that row's error, not the job's."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path).to_pydict()
    if suffix in (".csv", ".tsv"):
        options = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        # Every column as bytes: a numeric-looking caption or path must not become a number.
        unchecked = pacsv.ConvertOptions(check_utf8=False)  # only the header is read here
        with pacsv.open_csv(path, parse_options=options, convert_options=unchecked) as reader:
            names = reader.schema.names
        convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary()))
        return pacsv.read_csv(path, parse_options=options, convert_options=convert).to_pydict()
    if suffix == ".txt":
        lines = path.read_bytes().splitlines()
        if blank := sum(1 for line in lines if not line.strip()):  # counted, not silently gone
            logging.getLogger(__name__).warning("%s: %d blank line(s) skipped, not samples", path, blank)
        return {line_column: [line.strip() for line in lines if line.strip()]}
    raise ValueError(
        f"--data.source {path}: unsupported list format {suffix!r}; use .csv, .tsv, .parquet or .txt"
    )


def _listed_path(value: object) -> str | None:
    """A path of the list for text mode's metadata only: None where it is empty or not text."""
    try:
        return _cell(value) or None
    except ValueError:
        return None


def _pick(
    columns: dict[str, list], wanted: str | None, defaults: tuple[str, ...], option: str
) -> tuple[str, list] | None:
    """``(name, values)`` of the column asked for, or of the first default present."""
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"{option} {wanted!r} is not a column of the list; columns: {', '.join(columns)}"
            )
        return wanted, columns[wanted]
    return next(((name, columns[name]) for name in defaults if name in columns), None)
