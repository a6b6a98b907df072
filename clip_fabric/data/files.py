"""A list of images (and/or captions) in a CSV, TSV, parquet or plain-text file.

Paths are read from disk (relative ones against the list's folder); anything with a scheme
(``http://``, ``s3://``, ...) is read through fsspec.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clip_fabric.config import DataArgs
from clip_fabric.data import RawSample, Shard, chunk
from clip_fabric.data.folder import read_local

IMAGE_COLUMNS = ("image_path", "path", "filepath", "url", "image")
CAPTION_COLUMNS = ("caption", "text", "title")
URL_TIMEOUT_S = 30


def read_url(url: str) -> tuple[bytes | None, str | None]:
    try:
        with fsspec.open(url, "rb", timeout=URL_TIMEOUT_S) as f:
            data = f.read()
    except Exception as err:  # noqa: BLE001 - any failure of a remote read is a per-sample error
        return None, f"unreadable url: {type(err).__name__}: {err}"
    return (data, None) if data else (None, "empty file")


class FileListSource:
    def __init__(
        self,
        path: str,
        shard_size: int,
        image_column: str | None = None,
        caption_column: str | None = None,
        text_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.shard_size = shard_size
        columns = _read_table(self.path, "caption" if text_only else "image_path")
        self.images = _pick(columns, image_column, IMAGE_COLUMNS, "--data.image_column")
        self.captions = _pick(columns, caption_column, CAPTION_COLUMNS, "--data.caption_column")
        if text_only:
            self.images = None  # text mode reads no image, even where the list has paths
        if self.images is None and self.captions is None:
            raise ValueError(
                f"{path}: no image column ({'/'.join(IMAGE_COLUMNS)}) nor caption column "
                f"({'/'.join(CAPTION_COLUMNS)}); name one with --data.image_column or --data.caption_column"
            )
        self.count = len(self.images if self.images is not None else self.captions)

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> FileListSource:
        return cls(args.source, args.shard_size, args.image_column, args.caption_column, text_only)

    def shards(self) -> list[Shard]:
        return chunk(self.count, self.shard_size, str(self.path))

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        width = max(len(str(self.count - 1)), 9)
        for row in range(shard.start, shard.stop):
            caption = self.captions[row] if self.captions is not None else None
            sample = RawSample(f"{row:0{width}d}", caption=caption)
            if self.images is not None:
                location = self.images[row]
                sample.meta["image_path"] = location or ""
                if not location:
                    sample.error = "empty image path"
                elif "://" in location:
                    sample.image, sample.error = read_url(location)
                else:
                    path = Path(location)
                    sample.image, sample.error = read_local(
                        path if path.is_absolute() else self.path.parent / path
                    )
            yield sample

    def members(self, shard: Shard) -> list[str]:
        images = self.images[shard.start : shard.stop] if self.images is not None else None
        captions = self.captions[shard.start : shard.stop] if self.captions is not None else None
        return [
            f"{images[i] if images is not None else ''}\t{captions[i] if captions is not None else ''}"
            for i in range(shard.stop - shard.start)
        ]


def _read_table(path: Path, line_column: str) -> dict[str, list]:
    """Columns of the list; a ``.txt`` list is one ``line_column`` value per non-empty line."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path).to_pydict()
    if suffix in (".csv", ".tsv"):
        options = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        # Every column as text: a numeric-looking caption or path must not become a number.
        names = pacsv.read_csv(path, parse_options=options).column_names
        convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, "string"))
        return pacsv.read_csv(path, parse_options=options, convert_options=convert).to_pydict()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return {line_column: [line.strip() for line in lines if line.strip()]}
    raise ValueError(
        f"--data.source {path}: unsupported list format {suffix!r}; use .csv, .tsv, .parquet or .txt"
    )


def _pick(
    columns: dict[str, list], wanted: str | None, defaults: tuple[str, ...], option: str
) -> list | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"{option} {wanted!r} is not a column of the list; columns: {', '.join(columns)}"
            )
        return columns[wanted]
    return next((columns[name] for name in defaults if name in columns), None)
