"""The benchmark's images: photo-like JPEGs from the package's one generator (``data/synthetic.py``),
written as webdataset tar shards or as a folder of files, in a process pool, and cached so that a rerun
reuses them."""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import tarfile
import time
from pathlib import Path

# Bump when the generated images change (data/synthetic.py's photo picture), so that cached shards are not
# reused.
GENERATOR_VERSION = 2
JPEG_QUALITY = 90  # part of the cache folder's name; the generator is clip_fabric/data/synthetic.py
TARGET_SHARD_SIZE = 1000
# ``--image_sizes photo``: a size of its own for every image, as crawled photos and img2dataset's
# keep_ratio shards have: the shorter side uniform in [256, 768] px, the aspect ratio log-uniform in
# [0.5, 2], half of them portrait.
PHOTO = (0, 0)
PHOTO_SHORT_SIDE = (256, 768)
PHOTO_ASPECT = 2.0


def photo_size(index: int) -> tuple[int, int]:
    """(width, height) of image ``index`` of the photo-like set: the same on every run."""
    import numpy as np

    rng = np.random.default_rng((7, index))
    short = int(rng.integers(PHOTO_SHORT_SIDE[0], PHOTO_SHORT_SIDE[1] + 1))
    long = max(short, int(round(short * PHOTO_ASPECT ** float(rng.uniform(0, 1)))))
    return (long, short) if rng.uniform() < 0.5 else (short, long)


def image_size(index: int, size: tuple[int, int]) -> tuple[int, int]:
    """Image ``index``'s size in a set of ``size`` (PHOTO: its own)."""
    return photo_size(index) if size == PHOTO else size


def size_label(size: tuple[int, int]) -> str:
    return "photo" if size == PHOTO else f"{size[0]}x{size[1]}"


FOLDER_TASK = 500  # images per task of the folder generator's pool


def synthetic_photo(index: int, size: tuple[int, int], quality: int = JPEG_QUALITY) -> bytes:
    """Image ``index`` of the benchmark's sets: the package's one generator, its ``photo`` picture (the
    name stays for the scripts under docs/measurements/)."""
    from clip_fabric.data.synthetic import synthetic_image

    return synthetic_image(index, size, "photo", quality=quality)


def shard_layout(num_images: int, shard_size: int | None, workers: int) -> tuple[int, int]:
    """(shards, images per shard) for at least ``num_images`` images. Without an explicit size, the
    number of shards is a multiple of ``workers`` (every DataLoader worker of every run gets the same
    number of shards, so none idles while another finishes) and shards hold about 1,000 images."""
    if shard_size is not None:
        return math.ceil(num_images / shard_size), shard_size
    rounds = max(1, num_images // (workers * TARGET_SHARD_SIZE))
    shards = workers * rounds
    return shards, max(1, math.ceil(num_images / shards))


def _write_shard(task: tuple[str, int, int, int, int]) -> int:
    """Write shard ``index`` (images ``index*count ..``) as a tar, atomically; returns its JPEG bytes."""
    folder, index, count, width, height = task
    path = Path(folder) / f"{index:06d}.tar"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    jpeg_bytes = 0
    with tarfile.open(tmp, "w") as tar:
        for i in range(index * count, (index + 1) * count):
            dims = image_size(i, (width, height))
            jpeg = synthetic_photo(i, dims)
            jpeg_bytes += len(jpeg)
            caption = f"a synthetic photo number {i}, {dims[0]}x{dims[1]}".encode()
            for ext, data in (("jpg", jpeg), ("txt", caption)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return jpeg_bytes


def _write_files(task: tuple[str, list[int], int, int]) -> int:
    """Write the JPEGs ``indices`` into a folder, each atomically; returns their bytes."""
    folder, indices, width, height = task
    total = 0
    for i in indices:
        path = Path(folder) / f"{i:09d}.jpg"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        jpeg = synthetic_photo(i, image_size(i, (width, height)))
        tmp.write_bytes(jpeg)
        tmp.rename(path)
        total += len(jpeg)
    return total


def _generate(worker, tasks: list, what: str) -> None:
    """Run the generator tasks in a process pool of the machine's CPUs."""
    processes = min(len(tasks), max(1, os.cpu_count() or 1))
    print(f"clip_fabric benchmark: generating {what} ({processes} processes)", flush=True)
    with multiprocessing.get_context().Pool(processes) as pool:
        for _ in pool.imap_unordered(worker, tasks):
            pass


def make_dataset(
    work: Path, size: tuple[int, int], num_images: int, shard_size: int | None, workers: int
) -> dict:
    """The tar shards of one image size, generated where missing, else reused; ``workers`` is the
    shard-count granularity when ``shard_size`` is None (see ``shard_layout``)."""
    shards, per_shard = shard_layout(num_images, shard_size, workers)
    folder = work / "shards" / f"{size_label(size)}-s{per_shard}-q{JPEG_QUALITY}-v{GENERATOR_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(shards) if not (folder / f"{i:06d}.tar").is_file()]
    start = time.perf_counter()
    if missing:
        what = f"{len(missing) * per_shard} {size_label(size)} JPEGs in {len(missing)} shards into {folder}"
        _generate(_write_shard, [(str(folder), i, per_shard, *size) for i in missing], what)
    for stale in folder.glob("*.tmp*"):  # left by an interrupted generation
        stale.unlink(missing_ok=True)
    with tarfile.open(folder / "000000.tar") as tar:
        jpeg_sizes = [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]
    return {
        "image_size": size_label(size),
        "input": "webdataset",
        "dir": str(folder),
        "shards": shards,
        "shard_size": per_shard,
        "images": shards * per_shard,
        "mean_jpeg_kb": round(sum(jpeg_sizes) / len(jpeg_sizes) / 1000, 1),
        "gb_on_disk": round(sum((folder / f"{i:06d}.tar").stat().st_size for i in range(shards)) / 1e9, 3),
        "generated_s": round(time.perf_counter() - start, 1) if missing else None,
        "generated_shards": len(missing),
    }


def make_folder(work: Path, size: tuple[int, int], num_images: int, workers: int) -> dict:
    """A folder of ``num_images`` JPEG files of one size (no captions, as a folder of photos is), from
    the shards' generator: image ``i`` is the shards' image ``i``. ``shard_size`` is what the tuned
    ``predict`` runs pass as ``--data.shard_size``: a multiple of ``workers`` shards, as for tar shards."""
    name = f"{size_label(size)}-n{num_images}-q{JPEG_QUALITY}-v{GENERATOR_VERSION}"
    folder = work / "folders" / name
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(num_images) if not (folder / f"{i:09d}.jpg").is_file()]
    start = time.perf_counter()
    if missing:
        chunks = [missing[i : i + FOLDER_TASK] for i in range(0, len(missing), FOLDER_TASK)]
        what = f"{len(missing)} {size_label(size)} JPEG files into {folder}"
        _generate(_write_files, [(str(folder), chunk, *size) for chunk in chunks], what)
    for stale in folder.glob("*.tmp*"):
        stale.unlink(missing_ok=True)
    file_bytes = sum((folder / f"{i:09d}.jpg").stat().st_size for i in range(num_images))
    _, per_shard = shard_layout(num_images, None, workers)
    return {
        "image_size": size_label(size),
        "input": "folder",
        "dir": str(folder),
        "shards": math.ceil(num_images / per_shard),
        "shard_size": per_shard,
        "images": num_images,
        "mean_jpeg_kb": round(file_bytes / num_images / 1000, 1),
        "gb_on_disk": round(file_bytes / 1e9, 3),
        "generated_s": round(time.perf_counter() - start, 1) if missing else None,
        "generated_images": len(missing),
    }


def shard_pattern(data: dict, shards: int) -> str:
    """The first ``shards`` shards of a data set as a brace pattern, as ``--data.source`` takes it."""
    if shards == 1:
        return f"{data['dir']}/000000.tar"
    return f"{data['dir']}/{{000000..{shards - 1:06d}}}.tar"
