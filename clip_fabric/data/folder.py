"""A folder of images, searched recursively; a same-stem ``.txt`` file beside an image is its caption."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from clip_fabric.config import DataArgs
from clip_fabric.data import IMAGE_EXTENSIONS, RawSample, Shard, chunk


def read_local(path: Path) -> tuple[bytes | None, str | None]:
    """Bytes of a file, or the reason they cannot be had."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, f"unreadable file: {err.strerror or err}"
    if not data:
        return None, "empty file"
    return data, None


class FolderSource:
    def __init__(self, root: str, shard_size: int, text_only: bool = False) -> None:
        self.root = Path(root)
        self.text_only = text_only
        self.shard_size = shard_size
        suffixes = {"." + ext for ext in IMAGE_EXTENSIONS}
        # Sorted relative paths make the shard layout the same on every rank and every rerun.
        self.paths = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower() in suffixes and p.is_file()
        )

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> FolderSource:
        return cls(args.source, args.shard_size, text_only)

    def shards(self) -> list[Shard]:
        return chunk(len(self.paths), self.shard_size, str(self.root))

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        for rel in self.paths[shard.start : shard.stop]:
            path = self.root / rel
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
            image, error = (None, None) if self.text_only else read_local(path)
            if self.text_only and caption is None:
                error = f"no caption file {caption_path.name}"
            yield RawSample(rel, image, caption, {"image_path": str(path)}, error)

    def members(self, shard: Shard) -> list[str]:
        return self.paths[shard.start : shard.stop]
