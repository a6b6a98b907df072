"""``benchmark``: images/s of the model alone, of the whole pipeline from JPEG shards to embeddings on
disk, and of a naive loop on the same shards, measured in one run; a table, a JSON report and a PNG chart.

The command itself only orchestrates; it never touches a GPU. Each measurement runs in its own process,
so that one run cannot leave memory, threads or a CUDA context behind for the next:

- model only: ``python -m clip_fabric.benchmark model-only`` (this module's ``_model_only``): synthetic
  tensors already on the device through predict's own ``Embedder`` under each precision plugin, timed as
  ``verify-precision`` times it (best of two passes after a warm-up).
- end to end: ``python -m clip_fabric predict`` on webdataset shards of generated JPEGs, exactly as a
  user runs it; its ``summary.json`` gives the throughput it measured itself.
- naive baseline: ``python -m clip_fabric.benchmark naive`` (``_naive``): webdataset + open_clip's PIL
  ``preprocess`` in DataLoader workers, a float32 model, ``encode_image``, normalise, ``.cpu()``,
  ``np.save`` at the end: the loop of the article's ``scripts/benchmark.py`` and of a typical user.

While each process runs, ``nvidia-smi`` samples GPU utilisation every 200 ms.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from clip_fabric.config import ModelArgs

GENERATOR_VERSION = 1  # bump when the generated images change, so that cached shards are not reused
JPEG_QUALITY = 90
# Noise levels of the generated pictures: at quality 90 they give about 60-90 kB per 500x375 JPEG and
# 250-350 kB per 1024x768 one, the sizes of web photos (/work/shared/BASELINE.md: ~75 kB, ~310 kB).
NOISE_SIGMAS = (7, 9, 11, 13)
TARGET_SHARD_SIZE = 1000
MODEL_ONLY_BATCH = 1024  # model-only batch when --batch_size is auto
RANDOM_WEIGHTS = (
    "random-init weights (no pretrained weights are loaded): the compute, so the speed, is that of "
    "trained weights; the embeddings themselves are meaningless"
)
DEFAULT_WORK_DIR = str(Path(tempfile.gettempdir()) / "clip_fabric_benchmark")


def setup(
    model: ModelArgs = ModelArgs(),
    models: str | list[str] | None = None,
    precision: str | list[str] = "bf16-true",
    tf32: bool = False,
    image_sizes: str | list[str] = "500x375,1024x768",
    num_images: int | list[int] | None = None,
    shard_size: int | None = None,
    batch_size: int | Literal["auto"] = 1024,
    num_workers: int | None = None,
    accelerator: str = "auto",
    devices: int | list[int] = 1,
    decode: str | list[str] | None = None,
    predict_args: str | None = None,
    naive: bool = True,
    naive_batch_size: int = 256,
    naive_seconds: float = 10.0,
    model_seconds: float = 2.0,
    e2e_seconds: float = 10.0,
    work_dir: str = DEFAULT_WORK_DIR,
    output: str | None = None,
    chart: str | None = None,
    timeout_s: int = 300,
) -> dict:
    """Images/s of the model alone, of predict end to end, and of a naive loop, measured in one run.

    Model only: synthetic tensors already on the device. End to end: ``predict`` from JPEG webdataset
    shards that this command generates (and caches in ``work_dir``) to embeddings on disk. Naive: the same
    shards through PIL ``preprocess`` in DataLoader workers and a float32 model. With batch latency, peak
    memory and GPU utilisation. Prints tables, writes a JSON report and a PNG chart (docs/benchmarks.md).
    Weights are random (``--model.pretrained`` for real ones): the speed is that of trained weights.

    Args:
        model: The open_clip model: ``--model.config`` registers a custom config JSON (its stem is the
            name), ``--model.pretrained`` loads weights for every model measured.
        models: Model names to measure, e.g. ``[ViT-B-32,ViT-L-14]`` (default: ``--model.name``).
        precision: One precision or several (``[bf16-true,16-mixed]`` or comma-separated) for the
            model-only and end-to-end runs; bf16-true is the fastest measured (docs/precision.md). The
            naive baseline is always float32.
        tf32: Pass ``--tf32 true`` to the runs.
        image_sizes: ``WIDTHxHEIGHT`` of the generated JPEGs, one or several.
        num_images: Images per size (one number for all, or one per size); rounded up to whole shards.
            Default: 100,000 for images up to about 500x375, 20,000 for larger ones.
        shard_size: Images per tar shard (default: about 1,000, chosen so that the number of shards is a
            multiple of the DataLoader workers of every run, so that no worker idles at the end).
        batch_size: ``--data.batch_size`` of the end-to-end runs (an integer or ``auto``); also the
            model-only batch (1024 when ``auto``).
        num_workers: DataLoader workers per rank, for ``predict`` and the naive loop (default: the CPU
            count divided by the number of devices of the run).
        accelerator: ``cpu``, ``cuda``, ``gpu`` or ``auto``.
        devices: Device counts of the end-to-end runs, e.g. ``[1,2]`` for data-parallel scaling (images/s
            per count and the efficiency against linear scaling from the smallest count).
        decode: ``--data.decode`` modes of ``predict`` to compare, e.g. ``[cpu,gpu]`` (default: not
            passed, predict's own default).
        predict_args: More options for every ``predict`` run, as one string, e.g.
            ``"--data.cpu_decode_share 0.25"``.
        naive: Also measure the naive baseline (one device, float32).
        naive_batch_size: Batch size of the naive loop.
        naive_seconds: The naive loop reads one shard per worker and stops after this many seconds, so
            that a slow model does not hold up the run.
        model_seconds: Length of each timed model-only pass (two passes, the faster one counts).
        e2e_seconds: End-to-end runs read enough shards for about this many seconds at the model-only
            speed (all shards at most), so that fast and slow models both run long enough.
        work_dir: Cache of the generated shards (reused by a rerun), outputs and logs of the runs.
        output: JSON report path (default ``WORK_DIR/benchmark.json``).
        chart: PNG chart path (default ``WORK_DIR/benchmark.png``).
        timeout_s: A measurement process still running after this many seconds is stopped and reported as
            failed; the others go on.

    Returns:
        The report (also written to ``output``).
    """
    opts = _options(
        model, models, precision, tf32, image_sizes, num_images, shard_size, batch_size, num_workers,
        accelerator, devices, decode, predict_args, naive, naive_batch_size, naive_seconds, model_seconds,
        e2e_seconds, work_dir, output, chart, timeout_s,
    )  # fmt: skip
    work = Path(opts["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    datasets = [_make_dataset(work, size, count, opts) for size, count in opts["sets"]]

    print(f"clip_fabric benchmark: model only ({', '.join(opts['models'])})", flush=True)
    model_only, machine = _run_model_only(opts, work)
    report: dict[str, Any] = {
        "command": _command_line(),
        "weights": "pretrained: " + opts["model"].pretrained if opts["model"].pretrained else RANDOM_WEIGHTS,
        "machine": machine,
        "options": {k: v for k, v in opts.items() if k not in ("model", "sets")}
        | {"model": asdict(opts["model"])},
        "datasets": datasets,
        "model_only": model_only,
        "end_to_end": [],
        "naive": [],
    }
    gpu_count = machine.get("cuda_devices") or 0
    _save(report, opts, started, final=False)
    for name in opts["models"]:
        for data in datasets:
            for prec in opts["precisions"]:
                rate = next(
                    (r["images_per_s"] for r in model_only if (r["model"], r["precision"]) == (name, prec)),
                    None,
                )
                for decode_mode in opts["decodes"]:
                    for count in opts["devices"]:
                        report["end_to_end"].append(
                            _run_end_to_end(opts, work, name, prec, data, decode_mode, count, rate, gpu_count)
                        )
                        _save(report, opts, started, final=False)
            if opts["naive"]:
                report["naive"].append(_run_naive(opts, work, name, data))
                _save(report, opts, started, final=False)
    _save(report, opts, started, final=True)
    print(format_tables(report))
    print(
        f"clip_fabric benchmark: report {opts['output']}, chart {opts['chart']} ({report['seconds']:.0f} s)"
    )
    return report


def _save(report: dict, opts: dict, started: float, final: bool) -> None:
    """Write the report and the chart; also after each measurement (``complete: false``), so that a run
    cut short still leaves what it measured."""
    _add_ratios(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["complete"] = final
    out_path = Path(opts["output"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out_path)
    draw_chart(report, Path(opts["chart"]))


# ---------------------------------------------------------------------------------------------- options


def _as_list(value: Any) -> list:
    """A single value, a list, or (strings) comma-separated values, as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def parse_size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> ``(500, 375)``."""
    try:
        width, height = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--image_sizes {text!r} is not WIDTHxHEIGHT, e.g. 500x375") from None
    if width < 8 or height < 8:
        raise ValueError(f"--image_sizes {text!r}: width and height must be >= 8")
    return width, height


def default_num_images(size: tuple[int, int]) -> int:
    return 100_000 if size[0] * size[1] <= 1.5 * 500 * 375 else 20_000


def workers_per_rank(num_workers: int | None, devices: int) -> int:
    """DataLoader workers of each rank: as asked, else the machine's CPUs shared by the ranks."""
    if num_workers is not None:
        return num_workers
    return max(1, (os.cpu_count() or 1) // devices)


def shard_layout(num_images: int, shard_size: int | None, workers: int) -> tuple[int, int]:
    """(shards, images per shard) for at least ``num_images`` images. Without an explicit size, the
    number of shards is a multiple of ``workers`` (every DataLoader worker of every run gets the same
    number of shards, so none idles while another finishes) and shards hold about 1,000 images."""
    if shard_size is not None:
        return math.ceil(num_images / shard_size), shard_size
    rounds = max(1, num_images // (workers * TARGET_SHARD_SIZE))
    shards = workers * rounds
    return shards, max(1, math.ceil(num_images / shards))


def _total_workers(opts: dict) -> int:
    """Shard-count granularity: a common multiple of the DataLoader workers of all runs (all ranks)."""
    totals = [workers_per_rank(opts["num_workers"], n) * n for n in opts["devices"]]
    common = math.lcm(*totals)
    return common if common <= 4 * max(totals) else max(totals)


def _options(
    model, models, precision, tf32, image_sizes, num_images, shard_size, batch_size, num_workers,
    accelerator, devices, decode, predict_args, naive, naive_batch_size, naive_seconds, model_seconds,
    e2e_seconds, work_dir, output, chart, timeout_s,
) -> dict:  # fmt: skip
    """Every option checked and normalised, before any work: a bad one is a one-line ValueError."""
    from clip_fabric.precision import PRECISIONS

    sizes = [parse_size(s) for s in _as_list(image_sizes)]
    if not sizes:
        raise ValueError("--image_sizes is empty: give WIDTHxHEIGHT, e.g. 500x375")
    counts = _as_list(num_images) or [default_num_images(s) for s in sizes]
    if len(counts) == 1:
        counts = counts * len(sizes)
    if len(counts) != len(sizes):
        raise ValueError(f"--num_images: give one count, or one per image size ({len(sizes)}), not {counts}")
    if any(int(c) < 1 for c in counts):
        raise ValueError(f"--num_images must be >= 1, got {counts}")
    precisions = _as_list(precision)
    for name in precisions:
        if name not in PRECISIONS:
            raise ValueError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if not precisions:
        raise ValueError("--precision is empty")
    device_counts = [int(n) for n in _as_list(devices)]
    if not device_counts or any(n < 1 for n in device_counts):
        raise ValueError(f"--devices must be device counts >= 1, e.g. 1 or [1,2], got {devices}")
    if batch_size != "auto" and int(batch_size) < 1:
        raise ValueError(f"--batch_size must be >= 1 or auto, got {batch_size}")
    for option, value in (("num_workers", num_workers), ("shard_size", shard_size)):
        if value is not None and value < (0 if option == "num_workers" else 1):
            raise ValueError(f"--{option} must be >= {0 if option == 'num_workers' else 1}, got {value}")
    for option, value in (
        ("naive_batch_size", naive_batch_size),
        ("naive_seconds", naive_seconds),
        ("model_seconds", model_seconds),
        ("e2e_seconds", e2e_seconds),
        ("timeout_s", timeout_s),
    ):
        if value <= 0:
            raise ValueError(f"--{option} must be > 0, got {value}")
    model_names = _as_list(models) or [model.name]
    from clip_fabric.model import check_model

    for name in model_names:  # unknown names and unavailable weights fail here, before any work
        check_model(model_for(model, name))
    work = Path(work_dir).absolute()
    opts = {
        "model": model,
        "models": model_names,
        "precisions": precisions,
        "tf32": tf32,
        "sets": [(size, int(c)) for size, c in zip(sizes, counts, strict=True)],
        "image_sizes": [f"{w}x{h}" for w, h in sizes],
        "num_images": [int(c) for c in counts],
        "shard_size": shard_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "accelerator": accelerator,
        "devices": device_counts,
        "decodes": _as_list(decode) or [None],
        "predict_args": shlex.split(predict_args) if predict_args else [],
        "naive": naive,
        "naive_batch_size": naive_batch_size,
        "naive_seconds": naive_seconds,
        "model_seconds": model_seconds,
        "e2e_seconds": e2e_seconds,
        "work_dir": str(work),
        "output": str(Path(output).absolute()) if output else str(work / "benchmark.json"),
        "chart": str(Path(chart).absolute()) if chart else str(work / "benchmark.png"),
        "timeout_s": timeout_s,
    }
    check_predict_options(opts)
    return opts


def model_for(model: ModelArgs, name: str) -> ModelArgs:
    """``model``'s weights and cache for the model ``name`` (its config JSON only where it names it)."""
    if name == model.name:
        return model
    return ModelArgs(name=name, pretrained=model.pretrained, cache_dir=model.cache_dir)


def _command_line() -> str | None:
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        return "python -m clip_fabric " + shlex.join(sys.argv[1:])
    return None


# --------------------------------------------------------------------------------------------- datasets


def synthetic_photo(index: int, size: tuple[int, int], quality: int = JPEG_QUALITY) -> bytes:
    """A JPEG that compresses like a photo: a smooth random field of three octaves, upscaled, plus mild
    noise (pure noise would be several times larger than a photo, a flat field several times smaller).
    The same for a given index on every run."""
    import numpy as np
    from PIL import Image, ImageChops

    rng = np.random.default_rng(index)
    width, height = size
    small = (max(width // 4, 2), max(height // 4, 2))
    field = None
    for scale, weight in ((16, 1.0), (4, 0.33), (1, 0.14)):
        coarse = rng.integers(0, 256, size=(max(small[1] // scale, 2), max(small[0] // scale, 2), 3))
        layer = Image.fromarray(coarse.astype(np.uint8))
        layer = layer.resize(small, Image.BICUBIC) if layer.size != small else layer
        field = layer if field is None else Image.blend(field, layer, weight)
    image = field.resize(size, Image.BICUBIC)
    sigma = NOISE_SIGMAS[int(rng.integers(len(NOISE_SIGMAS)))]
    x, y = (int(v) for v in rng.integers(0, 256, 2))
    image = ImageChops.add(image, _noise(size, sigma).crop((x, y, x + width, y + height)), 1.0, -128)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_NOISE: dict = {}


def _noise(size: tuple[int, int], sigma: int):
    """Gaussian noise around 128, 256 pixels larger than ``size`` each way; made once per process."""
    if (size, sigma) not in _NOISE:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(sigma)
        values = rng.normal(128, sigma, size=(size[1] + 256, size[0] + 256, 3))
        _NOISE[size, sigma] = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return _NOISE[size, sigma]


def _write_shard(task: tuple[str, int, int, int, int]) -> int:
    """Write shard ``index`` (images ``index*count ..``) as a tar, atomically; returns its JPEG bytes."""
    folder, index, count, width, height = task
    path = Path(folder) / f"{index:06d}.tar"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    jpeg_bytes = 0
    with tarfile.open(tmp, "w") as tar:
        for i in range(index * count, (index + 1) * count):
            jpeg = synthetic_photo(i, (width, height))
            jpeg_bytes += len(jpeg)
            caption = f"a synthetic photo number {i}, {width}x{height}".encode()
            for ext, data in (("jpg", jpeg), ("txt", caption)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return jpeg_bytes


def _make_dataset(work: Path, size: tuple[int, int], num_images: int, opts: dict) -> dict:
    """The shards of one image size, generated where missing (in a process pool), else reused."""
    shards, per_shard = shard_layout(num_images, opts["shard_size"], _total_workers(opts))
    folder = work / "shards" / f"{size[0]}x{size[1]}-s{per_shard}-q{JPEG_QUALITY}-v{GENERATOR_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(shards) if not (folder / f"{i:06d}.tar").is_file()]
    start = time.perf_counter()
    if missing:
        processes = min(len(missing), max(1, os.cpu_count() or 1))
        print(
            f"clip_fabric benchmark: generating {len(missing) * per_shard} {size[0]}x{size[1]} JPEGs "
            f"in {len(missing)} shards ({processes} processes) into {folder}",
            flush=True,
        )
        tasks = [(str(folder), i, per_shard, *size) for i in missing]
        with multiprocessing.get_context().Pool(processes) as pool:
            for _ in pool.imap_unordered(_write_shard, tasks):
                pass
    for stale in folder.glob("*.tmp*"):  # left by an interrupted generation
        stale.unlink(missing_ok=True)
    jpeg_sizes = _jpeg_sizes(folder / "000000.tar")
    return {
        "image_size": f"{size[0]}x{size[1]}",
        "dir": str(folder),
        "shards": shards,
        "shard_size": per_shard,
        "images": shards * per_shard,
        "mean_jpeg_kb": round(sum(jpeg_sizes) / len(jpeg_sizes) / 1000, 1),
        "gb_on_disk": round(sum((folder / f"{i:06d}.tar").stat().st_size for i in range(shards)) / 1e9, 3),
        "generated_s": round(time.perf_counter() - start, 1) if missing else None,
        "generated_shards": len(missing),
    }


def _jpeg_sizes(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]


def _shard_pattern(data: dict, shards: int) -> str:
    """The first ``shards`` shards of a data set as a brace pattern, as ``--data.source`` takes it."""
    if shards == 1:
        return f"{data['dir']}/000000.tar"
    return f"{data['dir']}/{{000000..{shards - 1:06d}}}.tar"


# ------------------------------------------------------------------------------------------ subprocesses


class GpuSampler:
    """``nvidia-smi`` utilisation of some GPUs every 200 ms while a block runs (nothing without it)."""

    def __init__(self, gpus: list[int]) -> None:
        self.gpus = set(gpus)
        self.samples: list[tuple[float, int, float]] = []  # (seconds, gpu index, utilisation %)
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        cmd = [
            "nvidia-smi",
            "--query-gpu=index,utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                index, util = (float(v) for v in line.split(","))
            except ValueError:
                continue
            if int(index) in self.gpus:
                self.samples.append((time.perf_counter() - self.start, int(index), util))

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.thread.join(timeout=5)

    def summary(self) -> dict:
        """Mean utilisation over the whole process, and over its active span (first to last sample above
        0 % on each GPU: start-up and model loading excluded, stalls in between included)."""
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_active_mean": None}
        active = []
        for gpu in self.gpus:
            utils = [u for _, g, u in self.samples if g == gpu]
            busy = [i for i, u in enumerate(utils) if u > 0]
            if busy:
                active += utils[busy[0] : busy[-1] + 1]
        return {
            "gpu_util_mean": round(sum(u for _, _, u in self.samples) / len(self.samples), 1),
            "gpu_util_active_mean": round(sum(active) / len(active), 1) if active else 0.0,
        }


def _visible_gpus(count: int) -> list[int]:
    """nvidia-smi indices of the first ``count`` GPUs a child process will use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if all(v.isdigit() for v in ids):
            return [int(v) for v in ids[:count]]
    return list(range(count))


def _run_process(cmd: list[str], log_stem: Path, timeout_s: int, gpus: list[int]) -> dict:
    """Run ``cmd`` with its output in ``log_stem.out``/``.err``, sampling GPU use; stop it on timeout."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    # faulthandler: a run stopped for its time writes where each of its threads was to its .err log.
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    out_log, err_log = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with open(out_log, "w") as out, open(err_log, "w") as err, GpuSampler(gpus) as sampler:
        (log_stem.parent / f"{log_stem.name}.cmd").write_text(" ".join(cmd) + "\n")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
            error = None
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGABRT)  # the traceback of every thread of the main process
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(proc.pid, signal.SIGKILL)  # the process and the ranks and workers it started
            proc.wait()
            returncode, error = None, f"stopped after --timeout_s {timeout_s} s"
    wall = time.perf_counter() - start
    if returncode:
        error = _last_line(err_log) or f"exit status {returncode}"
    run = {"returncode": returncode, "error": error, "wall_s": round(wall, 1), "log": str(err_log)}
    return run | sampler.summary()


def _last_line(path: Path) -> str | None:
    lines = [ln.strip() for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    error = next((ln for ln in reversed(lines) if ln.startswith("clip_fabric: error:")), None)
    return error or (lines[-1] if lines else None)


def check_predict_options(opts: dict) -> None:
    """Parse the options of every end-to-end run (each decode mode) with predict's own signature, in this
    process and without running anything, so that an option predict refuses stops the benchmark before
    minutes of generating and measuring."""
    from jsonargparse import ArgumentParser

    from clip_fabric import predict

    for decode_mode in opts["decodes"]:
        cmd = _predict_command(
            opts, opts["models"][0], opts["precisions"][0], "shards.tar", Path("preflight"), decode_mode, 1
        )
        parser = ArgumentParser(exit_on_error=False)
        parser.add_function_arguments(predict.setup, as_positional=False)
        try:
            config = parser.parse_args(cmd[4:])
            (parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes)(config)
        except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError, a dataclass's ValueError
            reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ValueError(
                f"predict refuses the end-to-end options: {reason} (in: {' '.join(cmd[4:])})"
            ) from None


def _predict_command(
    opts: dict, name: str, prec: str, source: str, out_dir: Path, decode_mode: str | None, devices: int
) -> list[str]:
    model: ModelArgs = opts["model"]
    cmd = [
        sys.executable, "-m", "clip_fabric", "predict",
        "--data.format", "webdataset",
        "--data.source", source,
        "--output.dir", str(out_dir),
        "--output.overwrite", "true",
        "--model.name", name,
        "--precision", prec,
        "--data.batch_size", str(opts["batch_size"]),
        "--data.num_workers", str(workers_per_rank(opts["num_workers"], devices)),
        "--accelerator", opts["accelerator"],
        "--devices", str(devices),
    ]  # fmt: skip
    cmd += _model_options(model, name)
    if opts["tf32"]:
        cmd += ["--tf32", "true"]
    if decode_mode is not None:
        cmd += ["--data.decode", decode_mode]
    return cmd + opts["predict_args"]


def _model_options(model: ModelArgs, name: str) -> list[str]:
    cmd = []
    if model.config is not None and Path(model.config).stem == name:
        cmd += ["--model.config", str(Path(model.config).absolute())]
    if model.pretrained is not None:
        cmd += ["--model.pretrained", model.pretrained]
    if model.cache_dir is not None:
        cmd += ["--model.cache_dir", model.cache_dir]
    return cmd


def _worker_command(kind: str, request: dict, folder: Path) -> tuple[list[str], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.request.json").write_text(json.dumps(request, indent=2, default=str))
    result = folder / f"{kind}.result.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "clip_fabric.benchmark",
        kind,
        str(folder / f"{kind}.request.json"),
        str(result),
    ]
    return cmd, result


def _run_model_only(opts: dict, work: Path) -> tuple[list[dict], dict]:
    model: ModelArgs = opts["model"]
    batch = MODEL_ONLY_BATCH if opts["batch_size"] == "auto" else int(opts["batch_size"])
    request = {
        "models": [asdict(model_for(model, n)) for n in opts["models"]],
        "precisions": opts["precisions"],
        "tf32": opts["tf32"],
        "accelerator": opts["accelerator"],
        "batch_size": batch,
        "seconds": opts["model_seconds"],
    }
    cmd, result_path = _worker_command("model-only", request, work / "runs")
    run = _run_process(cmd, work / "logs" / "model-only", opts["timeout_s"] * 2, _visible_gpus(1))
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    machine = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        **result.get("machine", {}),
    }
    rows = result.get("rows") or [
        {"model": n, "precision": p, "batch_size": batch, "images_per_s": None, "error": run["error"]}
        for n in opts["models"]
        for p in opts["precisions"]
    ]
    for row in rows:
        row |= {k: run[k] for k in ("gpu_util_mean", "gpu_util_active_mean", "log")}
        print(f"  {_row_line(row)}", flush=True)
    return rows, machine


def _run_end_to_end(
    opts: dict,
    work: Path,
    name: str,
    prec: str,
    data: dict,
    decode_mode: str | None,
    devices: int,
    model_rate: float | None,
    gpu_count: int,
) -> dict:
    """One ``predict`` run as a user runs it; its own summary.json gives what it measured."""
    granule = _total_workers(opts)
    shards = data["shards"]
    if model_rate:  # enough images for about e2e_seconds at the model's own speed
        wanted = opts["e2e_seconds"] * model_rate * devices
        shards = min(shards, granule * max(1, math.ceil(wanted / (granule * data["shard_size"]))))
    label = f"{name}-{prec}-{data['image_size']}-{decode_mode or 'default'}-{devices}dev"
    out_dir = work / "out" / label
    row: dict[str, Any] = {
        "model": name,
        "precision": prec,
        "image_size": data["image_size"],
        "decode": decode_mode,
        "devices": devices,
        "num_workers": workers_per_rank(opts["num_workers"], devices),
        "batch_size": opts["batch_size"],
        "images": shards * data["shard_size"],
        "shards": shards,
        "output_dir": str(out_dir),
    }
    if opts["accelerator"] != "cpu" and gpu_count and devices > gpu_count:
        return row | {"images_per_s": None, "error": f"{devices} devices asked, {gpu_count} GPU(s) here"}
    cmd = _predict_command(opts, name, prec, _shard_pattern(data, shards), out_dir, decode_mode, devices)
    row["command"] = shlex.join(["python", *cmd[1:]])
    shutil.rmtree(out_dir, ignore_errors=True)  # no summary.json of an earlier run is read by mistake
    run = _run_process(cmd, work / "logs" / label, opts["timeout_s"], _visible_gpus(devices))
    summary_path = out_dir / "summary.json"
    summary = (
        json.loads(summary_path.read_text()) if run["returncode"] == 0 and summary_path.is_file() else {}
    )
    this = summary.get("this_run", {})
    latency = this.get("batch_latency_ms")
    row |= {
        # Steady state (each rank from its first batch written, summed) where predict could measure it.
        "images_per_s": this.get("steady_samples_per_s") or this.get("samples_per_s"),
        "run_images_per_s": this.get("samples_per_s"),
        "rows": this.get("rows"),
        "errors": this.get("errors"),
        "seconds": this.get("seconds"),
        "batch_size_used": this.get("batch_size"),
        "decode_used": this.get("decode"),
        "batch_latency_ms": latency if isinstance(latency, dict) else None,
        "peak_memory_gb": this.get("peak_memory_gb"),
    } | {k: run[k] for k in ("gpu_util_mean", "gpu_util_active_mean", "wall_s", "log")}
    row["error"] = run["error"] or (None if summary else f"no summary.json in {out_dir}")
    if summary and row["rows"] != row["images"]:
        row["error"] = f"{row['rows']} rows written for {row['images']} images (see {run['log']})"
    print(f"  {_row_line(row)}", flush=True)
    return row


def _run_naive(opts: dict, work: Path, name: str, data: dict) -> dict:
    """The naive loop on one shard per worker of the same data set, float32, one device."""
    model: ModelArgs = opts["model"]
    workers = workers_per_rank(opts["num_workers"], 1)
    shards = min(data["shards"], max(workers, 1))
    urls = [f"{data['dir']}/{i:06d}.tar" for i in range(shards)]
    label = f"naive-{name}-{data['image_size']}"
    request = {
        "model": asdict(model_for(model, name)),
        "urls": urls,
        "batch_size": opts["naive_batch_size"],
        "num_workers": workers,
        "accelerator": opts["accelerator"],
        "seconds": opts["naive_seconds"],
        "output": str(work / "out" / f"{label}.npy"),
    }
    cmd, result_path = _worker_command("naive", request, work / "runs" / label)
    run = _run_process(cmd, work / "logs" / label, opts["timeout_s"], _visible_gpus(1))
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    row = {
        "model": name,
        "precision": "32-true",
        "image_size": data["image_size"],
        "batch_size": opts["naive_batch_size"],
        "num_workers": workers,
        "images_available": shards * data["shard_size"],
        "images": result.get("images"),
        "seconds": result.get("seconds"),
        "images_per_s": result.get("images_per_s"),
        "stopped_at_time_limit": result.get("stopped_at_time_limit"),
        "peak_memory_gb": result.get("peak_memory_gb"),
        "embeddings_file": result.get("output"),
        "error": run["error"] or (None if result else "no result"),
    } | {k: run[k] for k in ("gpu_util_mean", "gpu_util_active_mean", "wall_s", "log")}
    print(f"  {_row_line(row | {'decode': 'naive'})}", flush=True)
    return row


def _add_ratios(report: dict) -> None:
    """Per end-to-end row: against the naive loop (same model and images; one device), against the
    model alone (times the devices), and the scaling efficiency against the smallest device count."""
    naive = {(r["model"], r["image_size"]): r.get("images_per_s") for r in report["naive"]}
    model_only = {(r["model"], r["precision"]): r.get("images_per_s") for r in report["model_only"]}
    rows = report["end_to_end"]
    for row in rows:
        rate = row.get("images_per_s")
        base = naive.get((row["model"], row["image_size"]))
        row["vs_naive"] = round(rate / base, 3) if rate and base and row["devices"] == 1 else None
        alone = model_only.get((row["model"], row["precision"]))
        row["of_model_only"] = round(rate / (alone * row["devices"]), 3) if rate and alone else None
        same = [
            r
            for r in rows
            if r.get("images_per_s")
            and all(r[k] == row[k] for k in ("model", "precision", "image_size", "decode"))
        ]
        smallest = min(same, key=lambda r: r["devices"], default=None)
        row["scaling_efficiency"] = (
            round(rate / (smallest["images_per_s"] * row["devices"] / smallest["devices"]), 3)
            if rate and smallest and len({r["devices"] for r in same}) > 1
            else None
        )


# ---------------------------------------------------------------------------------------------- output


def _row_line(row: dict) -> str:
    where = " ".join(
        str(row[k]) for k in ("model", "precision", "image_size", "decode") if row.get(k) is not None
    )
    if row.get("devices"):
        where += f" x{row['devices']}"
    if row.get("images_per_s"):
        return f"{where}: {row['images_per_s']:,.0f} images/s"
    return f"{where}: failed: {row.get('error')}"


def _e2e_decode(row: dict) -> str:
    return row.get("decode_used") or row.get("decode") or "default"


# (header, value of a row, format) of each table.
MODEL_ONLY_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("precision", lambda r: r["precision"], "{}"),
    ("batch", lambda r: r.get("batch_size"), "{}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("batch ms", lambda r: r.get("batch_latency_ms"), "{:.1f}"),
    ("peak GB", lambda r: r.get("peak_memory_gb"), "{:.2f}"),
    ("error", lambda r: r.get("error"), "{}"),
)
E2E_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("precision", lambda r: r["precision"], "{}"),
    ("image size", lambda r: r["image_size"], "{}"),
    ("images", lambda r: r.get("images"), "{:,}"),
    ("decode", _e2e_decode, "{}"),
    ("devices", lambda r: r["devices"], "{}"),
    ("workers/rank", lambda r: r["num_workers"], "{}"),
    ("batch", lambda r: r.get("batch_size_used") or r.get("batch_size"), "{}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("x naive", lambda r: r.get("vs_naive"), "{:.1f}"),
    ("of model only", lambda r: r.get("of_model_only"), "{:.0%}"),
    ("scaling eff.", lambda r: r.get("scaling_efficiency"), "{:.0%}"),
    ("batch ms p50", lambda r: (r.get("batch_latency_ms") or {}).get("p50"), "{:.1f}"),
    ("peak GB", lambda r: r.get("peak_memory_gb"), "{:.2f}"),
    ("GPU util %", lambda r: r.get("gpu_util_active_mean"), "{:.0f}"),
    ("error", lambda r: r.get("error"), "{}"),
)
NAIVE_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("image size", lambda r: r["image_size"], "{}"),
    ("images", lambda r: r.get("images"), "{:,}"),
    ("batch", lambda r: r["batch_size"], "{}"),
    ("workers", lambda r: r["num_workers"], "{}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("GPU util %", lambda r: r.get("gpu_util_active_mean"), "{:.0f}"),
    ("error", lambda r: r.get("error"), "{}"),
)


def _table(title: str, columns: tuple, rows: list[dict]) -> list[str]:
    lines = ["", title, "", "| " + " | ".join(c for c, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, value, fmt in columns:
            v = value(row)
            cells.append("" if v is None else fmt.format(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_tables(report: dict) -> str:
    """The report as Markdown tables: model only, end to end, naive."""
    machine = report.get("machine", {})
    lines = [
        f"{machine.get('device', '?')} x{machine.get('cuda_devices', 0)}, {machine.get('cpu_count')} CPUs; "
        + report["weights"].split(":")[0]
    ]
    lines += _table("Model only (synthetic tensors on the device)", MODEL_ONLY_COLUMNS, report["model_only"])
    lines += _table(
        "End to end (predict: JPEG shards -> embeddings on disk)", E2E_COLUMNS, report["end_to_end"]
    )
    if report["naive"]:
        title = "Naive baseline (webdataset + PIL preprocess in DataLoader workers, float32, one device)"
        lines += _table(title, NAIVE_COLUMNS, report["naive"])
    return "\n".join(lines)


COLOURS = {"model only": (66, 113, 196), "end to end": (46, 160, 90), "naive": (214, 80, 64)}


def draw_chart(report: dict, path: Path) -> None:
    """A labelled horizontal bar chart of images/s per measurement (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    bars = [("model only", f"{r['model']} {r['precision']} model only", r) for r in report["model_only"]]
    bars += [
        (
            "end to end",
            f"{r['model']} {r['precision']} {r['image_size']} decode {_e2e_decode(r)}, {r['devices']} dev",
            r,
        )
        for r in report["end_to_end"]
    ]
    bars += [("naive", f"{r['model']} fp32 {r['image_size']} naive", r) for r in report["naive"]]
    order = list(dict.fromkeys(row["model"] for _, _, row in bars))
    bars.sort(key=lambda bar: order.index(bar[2]["model"]))  # each model's bars together (stable)
    try:
        font = ImageFont.load_default(size=15)
        title_font = ImageFont.load_default(size=18)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        font = title_font = ImageFont.load_default()
    row_h, top, left, right = 26, 70, 20, 230
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max([probe.textlength(label, font=font) for _, label, _ in bars] or [100])) + 16
    width = max(1000, label_w + 600)
    height = top + row_h * max(len(bars), 1) + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    machine = report.get("machine", {})
    draw.text(
        (left, 12),
        f"clip_fabric benchmark: images/s on {machine.get('device', '?')}",
        fill="black",
        font=title_font,
    )
    draw.text((left, 38), report["weights"].split(":")[0], fill=(90, 90, 90), font=font)
    rates = [r.get("images_per_s") or 0 for _, _, r in bars]
    scale = (width - left - label_w - right) / max(max(rates, default=0), 1)
    for i, (kind, label, row) in enumerate(bars):
        y = top + i * row_h
        draw.text((left, y + 4), label, fill="black", font=font)
        x0 = left + label_w
        rate = row.get("images_per_s")
        if rate:
            draw.rectangle((x0, y + 3, x0 + max(int(rate * scale), 1), y + row_h - 4), fill=COLOURS[kind])
            text = f"{rate:,.0f}"
            if row.get("vs_naive"):
                text += f"  ({row['vs_naive']:.1f}x naive)"
            elif row.get("scaling_efficiency") and row.get("devices", 1) > 1:
                text += f"  ({row['scaling_efficiency']:.0%} of linear scaling)"
            draw.text((x0 + int(rate * scale) + 6, y + 4), text, fill="black", font=font)
        else:
            draw.text((x0, y + 4), "failed", fill=(200, 0, 0), font=font)
    x = left
    for kind, colour in COLOURS.items():
        draw.rectangle((x, height - 32, x + 16, height - 16), fill=colour)
        draw.text((x + 22, height - 34), kind, fill="black", font=font)
        x += int(probe.textlength(kind, font=font)) + 60
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ------------------------------------------------------------------------- measurement processes (workers)


def _model_only(request: dict) -> dict:
    """Model-only images/s per model and precision: predict's ``Embedder`` under each precision plugin, on
    one batch of random tensors already on the device, timed like ``verify-precision`` (warm-up, then the
    faster of two passes of about ``seconds`` each)."""
    import copy

    import torch

    from clip_fabric.model import load_model
    from clip_fabric.precision import device_capability

    rows = []
    capability, device_name = device_capability(request["accelerator"])
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for model_args in request["models"]:
        args = ModelArgs(**model_args)
        clip, _, _ = load_model(args)
        size = getattr(clip.visual, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else size
        for prec in request["precisions"]:
            row = {"model": args.name, "precision": prec, "batch_size": request["batch_size"]}
            try:
                row |= _time_model(copy.deepcopy(clip), prec, request, (height, width))
            except Exception as err:  # noqa: BLE001 - one failed precision (fp8 without fp8, OOM) is a row
                row |= {"images_per_s": None, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"{args.name} {prec}: {row.get('images_per_s')} images/s", flush=True)
        del clip
    machine = {
        "device": device_name,
        "capability": list(capability) if capability else None,
        "cuda_devices": cuda_devices,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for package in ("lightning", "open_clip_torch", "webdataset", "pillow", "numpy"):
        try:
            import importlib.metadata

            machine[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            machine[package] = None
    return {"rows": rows, "machine": machine}


def _time_model(clip, prec: str, request: dict, hw: tuple[int, int]) -> dict:
    """One precision: the plugin converts ``clip`` (a copy) in place."""
    import torch
    from lightning.fabric import Fabric

    from clip_fabric.model import Embedder
    from clip_fabric.precision import build_precision
    from clip_fabric.verify_precision import _timed as timed

    fabric = Fabric(
        accelerator=request["accelerator"],
        devices=1,
        plugins=build_precision(prec, request["tf32"], request["accelerator"]),
    )
    encoder = fabric.setup_module(Embedder(clip, frozenset({"image"})))
    cuda = fabric.device.type == "cuda"
    batch = fabric.to_device(torch.randn(request["batch_size"], 3, *hw))
    input_bytes = batch.numel() * batch.element_size()

    def encode(images: torch.Tensor) -> torch.Tensor:
        return encoder(images=images)["image"]

    with torch.inference_mode():
        timed(fabric, encode, [batch, batch], repeats=1)  # warm-up: kernel choice, lazy initialisation
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _, probe = timed(fabric, encode, [batch, batch], repeats=1)
        passes = max(3, min(1000, math.ceil(request["seconds"] / (probe / 2))))
        _, seconds = timed(fabric, encode, [batch] * passes, repeats=2)
    peak = (torch.cuda.max_memory_allocated() - input_bytes) / 1e9 if cuda else None
    return {
        "images_per_s": round(passes * request["batch_size"] / seconds, 1),
        "batch_latency_ms": round(seconds / passes * 1000, 2),
        "batches_timed": passes,
        "peak_memory_gb": round(peak, 3) if peak is not None else None,
        "device": str(fabric.device),
    }


def _identity(value: Any) -> Any:
    return value


def _naive(request: dict) -> dict:
    """The loop of the article's benchmark and of a typical user: webdataset + open_clip's PIL
    ``preprocess`` in DataLoader workers, a float32 model, ``encode_image``, normalise, ``.cpu()``,
    and the embeddings saved with ``np.save`` at the end. Timed from the first ``next(loader)`` to the
    saved file, like predict's own throughput; a run stopped at the time limit is measured up to its
    best point in its second half (see below)."""
    import numpy as np
    import open_clip
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    from clip_fabric.model import register_config

    args = ModelArgs(**request["model"])
    register_config(args)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.name, pretrained=args.pretrained, cache_dir=args.cache_dir
    )
    use_cuda = request["accelerator"] != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    model = model.to(device).eval()

    dataset = (
        wds.WebDataset(request["urls"], shardshuffle=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(preprocess, _identity)
    )
    workers = min(request["num_workers"], len(request["urls"]))
    loader = DataLoader(dataset, batch_size=request["batch_size"], num_workers=workers)
    embeddings, stopped, progress, count = [], False, [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for images, _captions in loader:
            features = model.encode_image(images.to(device))
            features /= features.norm(dim=-1, keepdim=True)
            embeddings.append(features.cpu())
            count += len(features)
            elapsed = time.perf_counter() - start
            progress.append((elapsed, count))
            if elapsed > request["seconds"]:
                stopped = True
                break
    del loader  # its workers stop here
    array = torch.cat(embeddings).numpy()
    Path(request["output"]).parent.mkdir(parents=True, exist_ok=True)
    np.save(request["output"], array)
    seconds = time.perf_counter() - start
    rate = len(array) / seconds
    if stopped:
        # Workers that start together deliver their batches in bursts; a run cut at the time limit may
        # end just after a burst began, which would understate its rate. The best images/elapsed of the
        # second half of the run is the rate at the end of a burst: the cut cannot count against it.
        rate = max(n / t for t, n in progress if t >= progress[-1][0] / 2)
    return {
        "images": len(array),
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 1),
        "stopped_at_time_limit": stopped,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if use_cuda else None,
        "output": request["output"],
    }


def _worker_main(argv: list[str]) -> int:
    """``python -m clip_fabric.benchmark {model-only|naive} REQUEST.json RESULT.json``."""
    kind, request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    result = {"model-only": _model_only, "naive": _naive}[kind](request)
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
