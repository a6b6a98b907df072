"""Shared fixtures: a tiny open_clip model with a checkpoint saved by the test, and small inputs."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_fabric.data.synthetic import synthetic_image

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """The one GPU gate: tests marked ``gpu`` skip cleanly where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config) -> Path:
    """A checkpoint of trained-looking (non-default) weights, saved the way open_clip saves them."""
    import open_clip

    open_clip.add_model_config(tiny_config)
    torch.manual_seed(1234)
    model = open_clip.create_model("tiny-clip")
    path = tiny_config.parent / "tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def jpeg_bytes(index: int, size: tuple[int, int], mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """Random pixels at Pillow's default quality: the package's generator, its ``noise`` picture."""
    return synthetic_image(index, size, "noise", mode=mode, fmt=fmt, quality=None)


SIZES = [(40, 30), (64, 64), (31, 57), (100, 20), (33, 33)]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """11 images in two sub-folders, most with captions, of several sizes and formats."""
    root = tmp_path / "images"
    for i in range(11):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        fmt, ext = ("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg")
        (sub / f"img{i:02d}.{ext}").write_bytes(jpeg_bytes(i, SIZES[i % len(SIZES)], fmt=fmt))
        (sub / f"img{i:02d}.txt").write_text(f"a picture of thing number {i}")
    return root


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def wds_shards(tmp_path) -> list[Path]:
    """Three tar shards of 5, 4 and 3 image-caption samples."""
    paths, index = [], 0
    for shard, count in enumerate((5, 4, 3)):
        samples = []
        for _ in range(count):
            samples.append(
                {
                    "__key__": f"s{index:05d}",
                    "jpg": jpeg_bytes(index, SIZES[index % 5]),
                    "txt": f"caption {index}".encode(),
                }
            )
            index += 1
        paths.append(write_tar(tmp_path / f"shard-{shard:06d}.tar", samples))
    return paths


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m clip_fabric ARGS`` in a fresh process, as a user runs it."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "clip_fabric", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``python -m clip_fabric ARGS`` in this process (no interpreter start-up: for errors raised before
    any work); the same exit status and stderr line as a user sees."""
    from clip_fabric.__main__ import main

    capsys.readouterr()
    try:
        main(list(args))
        code, message = 0, ""
    except SystemExit as exit:  # sys.exit("...") prints its message only when the interpreter handles it
        code, message = (1, f"{exit.code}\n") if isinstance(exit.code, str) else (exit.code or 0, "")
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err + message)


def read_output(out_dir: Path, tower: str = "img_emb") -> tuple[np.ndarray, list[str]]:
    """All rows of an output folder, ordered by shard, with their keys."""
    import pyarrow.parquet as pq

    arrays, keys = [], []
    for npy in sorted((out_dir / tower).glob("*.npy")):
        name = npy.stem.split("_")[-1]
        arrays.append(np.load(npy))
        keys += pq.read_table(out_dir / "metadata" / f"metadata_{name}.parquet").column("key").to_pylist()
    return (np.concatenate(arrays) if arrays else np.zeros((0, 0))), keys


def progress_rows(text: str) -> int:
    """The highest count on rank 0's progress bar in a run's stderr (``embedding: 7%|...| M/480 [...]``)."""
    return max((int(m) for m in re.findall(r"embedding: .*?(\d+)/\d+ \[", text)), default=0)
