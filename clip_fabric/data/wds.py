"""WebDataset tar shards (local paths, brace patterns, URLs or ``pipe:`` commands): one tar, one shard.

Tars are read with webdataset's own tar iterators; the split across ranks and workers is ours so that
a shard's index, and so its output file, is the same on every run whatever the world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import braceexpand
from webdataset import tariterators

from clip_fabric.config import DataArgs
from clip_fabric.data import IMAGE_EXTENSIONS, RawSample, Shard

CAPTION_FIELDS = ("txt", "caption", "text")


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
    def __init__(self, urls: list[str], text_only: bool = False) -> None:
        self.urls = urls
        self.text_only = text_only

    @classmethod
    def from_args(cls, args: DataArgs, text_only: bool) -> WebDatasetSource:
        urls = expand_urls(args.source)
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if len(missing) == len(urls):
            raise ValueError(f"--data.source {args.source!r}: none of its {len(urls)} tar files exists")
        return cls(urls, text_only)

    def shards(self) -> list[Shard]:
        return [Shard(i, url) for i, url in enumerate(self.urls)]

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        # Grouping files into samples is done here rather than by webdataset's group_by_keys so that a
        # read error still hands over the sample gathered before it.
        count, current = 0, None
        try:
            streams = tariterators.url_opener([{"url": shard.name}])
            for file in tariterators.tar_file_expander(streams):
                key, ext = tariterators.base_plus_ext(file.get("fname", ""))
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    count += 1
                    yield self._raw(current)
                    current = None
                current = current or {"__key__": key}
                current[ext.lower()] = file["data"]
            _check_tar_size(shard.name)
        except Exception as err:  # noqa: BLE001 - a broken tar keeps the samples read before the break
            if current is not None:
                count += 1
                yield self._raw(current)
                current = None
            yield RawSample(
                f"{Path(shard.name).name}#{count}",
                error=f"tar shard unreadable after {count} samples: {type(err).__name__}: {err}",
            )
        if current is not None:
            yield self._raw(current)

    def _raw(self, sample: dict) -> RawSample:
        caption = next((sample[f] for f in CAPTION_FIELDS if f in sample), None)
        raw = RawSample(sample["__key__"], caption=caption.decode("utf-8").strip() if caption else None)
        if "cls" in sample:  # the class index of a labelled sample, for zero-shot evaluation
            raw.meta["label"] = sample["cls"].decode("utf-8").strip()
        if self.text_only:
            if raw.caption is None:
                raw.error = "no caption field (txt) in sample"
            return raw
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raw.error = f"no image field ({'/'.join(IMAGE_EXTENSIONS)}) in sample"
        elif not sample[ext]:
            raw.error = "empty file"
        else:
            raw.image = sample[ext]
        return raw

    def members(self, shard: Shard) -> list[str]:
        """The tar's URL, and its size and mtime when it is a local file (a tar rewritten in place)."""
        if "://" in shard.name or shard.name.startswith("pipe:"):
            return [shard.name]
        try:
            stat = Path(shard.name).stat()
        except OSError:
            return [shard.name, "missing"]
        return [shard.name, str(stat.st_size), str(stat.st_mtime_ns)]


def _check_tar_size(url: str) -> None:
    """Tar files are whole 512-byte blocks: anything else was cut, maybe inside a header that tarfile
    reads as a clean end of archive."""
    path = Path(url)
    if "://" not in url and not url.startswith("pipe:") and path.stat().st_size % 512:
        raise OSError(f"{path.stat().st_size} bytes is not a whole number of 512-byte tar blocks")
