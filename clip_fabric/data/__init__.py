"""Input sources: each lists its shards (the unit of work, resume and output) and yields raw samples.

A new input format is one new module with a ``Source`` class registered in ``SOURCES``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

from clip_fabric.config import DataArgs

BASE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Raster formats Pillow decodes, listed where this Pillow opens them (AVIF since Pillow 11.2; HEIC/HEIF
# and JPEG XL where their plugin, pillow-heif or pillow-jxl-plugin, is installed). A tar sample's image
# member is the first of these present, in this order.
MORE_EXTENSIONS = ("jfif", "jpe", "apng", "avif", "heic", "heif", "jxl", "jp2", "j2k", "qoi", "tga", "ppm",
                   "pgm", "pbm", "pnm", "ico")  # fmt: skip


def _image_extensions() -> tuple[str, ...]:
    from PIL import Image

    with suppress(ImportError):  # the HEIF plugin registers itself only when asked
        from pillow_heif import register_heif_opener

        register_heif_opener()
    with suppress(ImportError):
        import pillow_jxl  # noqa: F401 - registers JPEG XL on import
    Image.init()
    readable = {ext.lstrip(".") for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return BASE_EXTENSIONS + tuple(ext for ext in MORE_EXTENSIONS if ext in readable)


IMAGE_EXTENSIONS = _image_extensions()


@dataclass(frozen=True)
class Shard:
    """One unit of work: a tar file, or rows ``[start, stop)`` of a listing."""

    index: int
    name: str
    start: int = 0
    stop: int = 0


@dataclass
class RawSample:
    """A sample as read, before decoding. ``error`` set means it could not be read."""

    key: str
    image: bytes | None = None
    caption: str | None = None
    meta: dict[str, str | None] = field(default_factory=dict)  # more metadata columns (image_path, .json)
    error: str | None = None
    caption_error: str | None = None  # why ``caption`` is None where a caption was there but unreadable


class Source(Protocol):
    def shards(self) -> list[Shard]: ...

    def samples(self, shard: Shard) -> Iterator[RawSample]: ...

    def members(self, shard: Shard) -> list[str]:
        """What decides the shard's samples (paths, list rows, a tar's identity), for the run folder's
        stored plan: a rerun whose done shards list other members is refused."""
        ...


def build_source(args: DataArgs, text_only: bool = False) -> Source:
    """The source for ``args.format``; ``text_only`` sources skip reading image bytes."""
    from clip_fabric.data.files import FileListSource
    from clip_fabric.data.folder import FolderSource
    from clip_fabric.data.synthetic import SyntheticSource
    from clip_fabric.data.wds import WebDatasetSource

    sources = {
        "folder": FolderSource,
        "files": FileListSource,
        "webdataset": WebDatasetSource,
        "synthetic": SyntheticSource,
    }
    return sources[args.format].from_args(args, text_only)


def chunk(count: int, size: int | str, name: str) -> list[Shard]:
    """Split ``count`` listed samples into shards of ``size`` (the last may be shorter); ``auto`` sizes
    them by the count (``sizing.auto_shard_size``)."""
    if size == "auto":
        from clip_fabric.data.sizing import auto_shard_size

        size = auto_shard_size(count)
    return [Shard(i, name, start, min(start + size, count)) for i, start in enumerate(range(0, count, size))]
