"""The benchmark's options: one torch-free dataclass, checked and normalised on construction.

jsonargparse reads the fields and their docstrings as the command's flat options (``--models``,
``--precision``, ...; ``--model.*`` for the nested model group), so a bad value is a one-line ValueError
before any work. What needs the project itself (precision names, open_clip models, predict's own parser)
is checked in ``check_names`` and ``runs.check_predict_options``.
"""

from __future__ import annotations

import math
import os
import shlex
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clip_fabric.benchmark.shards import PHOTO, size_label
from clip_fabric.config import ModelArgs

DEFAULT_WORK_DIR = str(Path(tempfile.gettempdir()) / "clip_fabric_benchmark")
MODEL_ONLY_BATCH = 1024  # model-only batch when --batch_size is auto


@dataclass
class BenchmarkArgs:
    """What the benchmark measures, on which generated images, and where it writes."""

    # This docstring is the title of the --model.* group in --help, printed as written (not re-indented).
    model: ModelArgs = field(default_factory=ModelArgs)
    """The open_clip model: ``--model.config`` registers a custom config JSON (its stem is the
name), ``--model.pretrained`` loads weights for every model measured."""
    models: str | list[str] | None = None
    """Model names to measure, e.g. ``[ViT-B-32,ViT-L-14]`` (default: ``--model.name``)."""
    precision: str | list[str] = "bf16-true"
    """One precision or several (``[bf16-true,16-mixed]`` or comma-separated) for the model-only and
    end-to-end runs; bf16-true is the fastest measured (docs/precision.md). The naive baseline is always
    float32."""
    tf32: bool = False
    """Pass ``--tf32 true`` to the runs."""
    image_sizes: str | list[str] = "photo,500x375,1024x768"
    """``WIDTHxHEIGHT`` of the generated JPEGs, one or several; ``photo``: a size of its own for every
    image (shorter side 256-768 px, aspect 0.5-2), as real photo collections have."""
    num_images: int | list[int] | None = None
    """Images per size (one number for all, or one per size); rounded up to whole shards. Default:
    100,000 for images up to about 500x375, 20,000 for larger ones."""
    shard_size: int | None = None
    """Images per tar shard (default: about 1,000, chosen so that the number of shards is a multiple of
    the DataLoader workers of every run, so that no worker idles at the end)."""
    batch_size: int | Literal["auto"] = 1024
    """``--data.batch_size`` of the end-to-end runs (an integer or ``auto``); also the model-only batch
    (1024 when ``auto``)."""
    num_workers: int | None = None
    """DataLoader workers per rank, for ``predict`` and the naive loop (default: the CPU count divided by
    the number of devices of the run)."""
    accelerator: str = "auto"
    """``cpu``, ``cuda``, ``gpu`` or ``auto``."""
    devices: int | list[int] = 1
    """Device counts of the end-to-end runs, e.g. ``[1,2]`` for data-parallel scaling (images/s per
    count and the efficiency against linear scaling from the smallest count)."""
    decode: str | list[str] | None = None
    """``--data.decode`` modes of ``predict`` to compare, e.g. ``[cpu,gpu]`` (default: not passed,
    predict's own default)."""
    predict_args: str | None = None
    """More options for every ``predict`` run, as one string, e.g. ``"--data.cpu_decode_share 0.25"``."""
    defaults: bool = False
    """Also run ``predict`` with its own defaults on each data set, beside the tuned runs: only the model,
    data and output options, as a user types it (no precision, batch size, workers, decode, tf32 or
    ``--predict_args``); reports its images/s and its ratio to the best tuned run (``defaults[]``)."""
    folder_images: int = 0
    """Also generate a folder of this many JPEGs of each image size (the shards' generator, no captions)
    and measure ``predict --data.format folder`` on it like the shards (0: no folder)."""
    naive: bool = True
    """Also measure the naive baseline (one device, float32)."""
    naive_batch_size: int = 256
    """Batch size of the naive loop."""
    naive_seconds: float = 10.0
    """The naive loop reads one shard per worker and stops after this many seconds, so that a slow model
    does not hold up the run."""
    model_seconds: float = 2.0
    """Length of each timed model-only pass (two passes, the faster one counts)."""
    e2e_seconds: float = 10.0
    """End-to-end runs read enough shards for about this many seconds at the model-only speed (all
    shards at most), so that fast and slow models both run long enough."""
    work_dir: str = DEFAULT_WORK_DIR
    """Cache of the generated shards (reused by a rerun), outputs and logs of the runs."""
    output: str | None = None
    """JSON report path (default ``WORK_DIR/benchmark.json``)."""
    chart: str | None = None
    """PNG chart path (default ``WORK_DIR/benchmark.png``)."""
    timeout_s: int = 300
    """A measurement process still running after this many seconds is stopped and reported as failed;
    the others go on."""

    # Normalised forms of the options above, set by __post_init__: what the rest of the package reads.
    model_names: list[str] = field(init=False)
    precisions: list[str] = field(init=False)
    sets: list[tuple[tuple[int, int], int]] = field(init=False)  # ((width, height), images) per size
    device_counts: list[int] = field(init=False)
    decodes: list[str | None] = field(init=False)  # None: --data.decode not passed
    extra_predict_args: list[str] = field(init=False)
    work: Path = field(init=False)
    output_path: Path = field(init=False)
    chart_path: Path = field(init=False)

    def __post_init__(self) -> None:
        sizes = [parse_size(s) for s in as_list(self.image_sizes)]
        if not sizes:
            raise ValueError("--image_sizes is empty: give WIDTHxHEIGHT, e.g. 500x375")
        counts = as_list(self.num_images) or [default_num_images(s) for s in sizes]
        if len(counts) == 1:
            counts = counts * len(sizes)
        if len(counts) != len(sizes):
            raise ValueError(
                f"--num_images: give one count, or one per image size ({len(sizes)}), not {counts}"
            )
        if any(int(c) < 1 for c in counts):
            raise ValueError(f"--num_images must be >= 1, got {counts}")
        self.precisions = as_list(self.precision)
        if not self.precisions:
            raise ValueError("--precision is empty")
        self.device_counts = [int(n) for n in as_list(self.devices)]
        if not self.device_counts or any(n < 1 for n in self.device_counts):
            raise ValueError(f"--devices must be device counts >= 1, e.g. 1 or [1,2], got {self.devices}")
        if self.batch_size != "auto" and int(self.batch_size) < 1:
            raise ValueError(f"--batch_size must be >= 1 or auto, got {self.batch_size}")
        for option, value, least in (
            ("num_workers", self.num_workers, 0),
            ("shard_size", self.shard_size, 1),
            ("folder_images", self.folder_images, 0),
        ):
            if value is not None and value < least:
                raise ValueError(f"--{option} must be >= {least}, got {value}")
        for option in ("naive_batch_size", "naive_seconds", "model_seconds", "e2e_seconds", "timeout_s"):
            if getattr(self, option) <= 0:
                raise ValueError(f"--{option} must be > 0, got {getattr(self, option)}")
        self.model_names = as_list(self.models) or [self.model.name]
        self.sets = [(size, int(c)) for size, c in zip(sizes, counts, strict=True)]
        self.decodes = as_list(self.decode) or [None]
        self.extra_predict_args = shlex.split(self.predict_args) if self.predict_args else []
        self.work = Path(self.work_dir).absolute()
        self.output_path = Path(self.output).absolute() if self.output else self.work / "benchmark.json"
        self.chart_path = Path(self.chart).absolute() if self.chart else self.work / "benchmark.png"

    @property
    def model_only_batch(self) -> int:
        return MODEL_ONLY_BATCH if self.batch_size == "auto" else int(self.batch_size)

    def workers(self, devices: int) -> int:
        """DataLoader workers of each rank: as asked, else the machine's CPUs shared by the ranks."""
        if self.num_workers is not None:
            return self.num_workers
        return max(1, (os.cpu_count() or 1) // devices)

    def total_workers(self) -> int:
        """Shard-count granularity: a common multiple of the DataLoader workers of all runs (all ranks)."""
        totals = [self.workers(n) * n for n in self.device_counts]
        common = math.lcm(*totals)
        return common if common <= 4 * max(totals) else max(totals)

    def model_for(self, name: str) -> ModelArgs:
        """``--model``'s weights and cache for the model ``name`` (its config JSON only where it names
        it)."""
        if name == self.model.name:
            return self.model
        return ModelArgs(name=name, pretrained=self.model.pretrained, cache_dir=self.model.cache_dir)

    def as_report(self) -> dict[str, Any]:
        """The options as resolved, under the report's ``options`` keys."""
        return {
            "models": self.model_names,
            "precisions": self.precisions,
            "tf32": self.tf32,
            "image_sizes": [size_label(size) for size, _ in self.sets],
            "num_images": [c for _, c in self.sets],
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "accelerator": self.accelerator,
            "devices": self.device_counts,
            "decodes": self.decodes,
            "predict_args": self.extra_predict_args,
            "defaults": self.defaults,
            "folder_images": self.folder_images,
            "naive": self.naive,
            "naive_batch_size": self.naive_batch_size,
            "naive_seconds": self.naive_seconds,
            "model_seconds": self.model_seconds,
            "e2e_seconds": self.e2e_seconds,
            "work_dir": str(self.work),
            "output": str(self.output_path),
            "chart": str(self.chart_path),
            "timeout_s": self.timeout_s,
            "model": asdict(self.model),
        }


def check_names(args: BenchmarkArgs) -> None:
    """Precision and model names, against the project and open_clip: unknown names and unavailable
    weights fail here, before any work."""
    from clip_fabric.model import check_model
    from clip_fabric.precision import PRECISIONS

    for name in args.precisions:
        if name not in PRECISIONS:
            raise ValueError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    for name in args.model_names:
        check_model(args.model_for(name))


def as_list(value: Any) -> list:
    """A single value, a list, or (strings) comma-separated values, as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def parse_size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> ``(500, 375)``; ``"photo"`` -> ``PHOTO`` (sizes varying per image)."""
    if str(text).strip().lower() == "photo":
        return PHOTO
    try:
        width, height = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--image_sizes {text!r} is not WIDTHxHEIGHT (e.g. 500x375) or photo") from None
    if width < 8 or height < 8:
        raise ValueError(f"--image_sizes {text!r}: width and height must be >= 8")
    return width, height


def default_num_images(size: tuple[int, int]) -> int:
    if size == PHOTO:
        return 40_000
    return 100_000 if size[0] * size[1] <= 1.5 * 500 * 375 else 20_000
