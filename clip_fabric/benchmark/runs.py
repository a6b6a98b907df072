"""The command's side of each measurement: build its process's command line, run it (``processes.py``)
and turn what it wrote into a report row. End to end is ``python -m clip_fabric predict`` as a user runs
it, with the tuned options or with none (``--defaults``); model only and naive are ``measure.py``."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clip_fabric.benchmark.options import BenchmarkArgs
from clip_fabric.benchmark.processes import run_process, visible_gpus
from clip_fabric.benchmark.report import row_line
from clip_fabric.benchmark.shards import shard_pattern

PREDICT = [sys.executable, "-m", "clip_fabric", "predict"]


def source_options(data: dict, shards: int | None = None) -> list[str]:
    """``--data.format`` and ``--data.source`` of a data set (its first ``shards`` tar shards)."""
    if data["input"] == "folder":
        return ["--data.format", "folder", "--data.source", data["dir"]]
    return ["--data.format", "webdataset", "--data.source", shard_pattern(data, shards or data["shards"])]


def tuned_options(
    args: BenchmarkArgs, name: str, prec: str, data: dict, shards: int | None, out_dir: Path,
    decode_mode: str | None, devices: int,
) -> list[str]:  # fmt: skip
    """``predict``'s options of a tuned end-to-end run: every performance option the benchmark sets."""
    cmd = [
        *source_options(data, shards),
        "--output.dir", str(out_dir),
        "--output.overwrite", "true",
        "--model.name", name,
        "--precision", prec,
        "--data.batch_size", str(args.batch_size),
        "--data.num_workers", str(args.workers(devices)),
        "--accelerator", args.accelerator,
        "--devices", str(devices),
    ]  # fmt: skip
    cmd += model_options(args, name)
    if data["input"] == "folder":  # a whole number of shards per worker, as for the tar shards
        cmd += ["--data.shard_size", str(data["shard_size"])]
    if args.tf32:
        cmd += ["--tf32", "true"]
    if decode_mode is not None:
        cmd += ["--data.decode", decode_mode]
    return cmd + args.extra_predict_args


def default_options(
    args: BenchmarkArgs, name: str, data: dict, shards: int | None, out_dir: Path, devices: int
) -> list[str]:
    """``predict``'s options as a user types them: the model, the data and the output folder, nothing
    about speed, so that whatever predict's defaults are is what is measured. ``--accelerator`` and
    ``--devices`` only where the benchmark itself was told which devices to use."""
    cmd = [*source_options(data, shards), "--output.dir", str(out_dir), "--model.name", name]
    cmd += model_options(args, name)
    if args.accelerator != "auto":
        cmd += ["--accelerator", args.accelerator]
    if devices != 1:
        cmd += ["--devices", str(devices)]
    return cmd


def model_options(args: BenchmarkArgs, name: str) -> list[str]:
    model, cmd = args.model, []
    if model.config is not None and Path(model.config).stem == name:
        cmd += ["--model.config", str(Path(model.config).absolute())]
    if model.pretrained is not None:
        cmd += ["--model.pretrained", model.pretrained]
    if model.cache_dir is not None:
        cmd += ["--model.cache_dir", model.cache_dir]
    return cmd


def check_predict_options(args: BenchmarkArgs) -> None:
    """Parse the options of every kind of ``predict`` run (each decode mode, the folder's, the defaults')
    with predict's own signature, in this process and without running anything, so that an option
    predict refuses stops the benchmark before minutes of generating and measuring."""
    from jsonargparse import ArgumentParser

    from clip_fabric import predict

    name, prec, out = args.model_names[0], args.precisions[0], Path("preflight")
    shards = {"input": "webdataset", "dir": ".", "shards": 1}
    # The folder is generated later; predict only checks that its source is a folder, so any will do.
    folder = {"input": "folder", "dir": tempfile.gettempdir(), "shard_size": 1}
    runs = [tuned_options(args, name, prec, shards, 1, out, d, 1) for d in args.decodes]
    if args.folder_images:
        runs += [tuned_options(args, name, prec, folder, None, out, d, 1) for d in args.decodes]
    if args.defaults:
        runs.append(default_options(args, name, shards, 1, out, 1))
    for cmd in runs:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_function_arguments(predict.setup, as_positional=False)
        try:
            config = parser.parse_args(cmd)
            (parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes)(config)
        except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError, a dataclass's ValueError
            reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ValueError(
                f"predict refuses the end-to-end options: {reason} (in: {' '.join(cmd)})"
            ) from None


def shards_to_read(args: BenchmarkArgs, data: dict, model_rate: float | None, devices: int) -> int | None:
    """Tar shards an end-to-end run reads: enough for about ``--e2e_seconds`` at the model's own speed,
    in whole rounds of the workers, all at most (None for a folder: it is read whole)."""
    if data["input"] == "folder":
        return None
    granule, shards = args.total_workers(), data["shards"]
    if model_rate:
        wanted = args.e2e_seconds * model_rate * devices
        shards = min(shards, granule * max(1, math.ceil(wanted / (granule * data["shard_size"]))))
    return shards


def _run_predict(args: BenchmarkArgs, label: str, options: list[str], out_dir: Path, devices: int) -> dict:
    """One ``predict`` process; what its own summary.json says it measured."""
    cmd = PREDICT + options
    shutil.rmtree(out_dir, ignore_errors=True)  # no summary.json of an earlier run is read by mistake
    run = run_process(cmd, args.work / "logs" / label, args.timeout_s, visible_gpus(devices))
    summary_path = out_dir / "summary.json"
    summary = (
        json.loads(summary_path.read_text()) if run["returncode"] == 0 and summary_path.is_file() else {}
    )
    this, config = summary.get("this_run", {}), summary.get("config", {})
    latency = this.get("batch_latency_ms")
    row = {
        "command": shlex.join(["python", *cmd[1:]]),
        # Steady state (each rank from its first batch written, summed) where predict could measure it.
        "images_per_s": this.get("steady_samples_per_s") or this.get("samples_per_s"),
        "run_images_per_s": this.get("samples_per_s"),
        "rows": this.get("rows"),
        "errors": this.get("errors"),
        "seconds": this.get("seconds"),
        "batch_size_used": this.get("batch_size"),
        "decode_used": this.get("decode"),
        "cpu_decode_share_used": this.get("cpu_decode_share"),  # of the JPEGs, beside the GPU decoder
        # What predict ran with, as its summary says: the resolved value where it records one (this
        # run's), else the option as given (its config), e.g. ``auto``.
        "precision_used": _first(this.get("precision"), config.get("precision")),
        "num_workers_used": _first(this.get("num_workers"), config.get("data", {}).get("num_workers")),
        "shard_size_used": _first(this.get("shard_size"), config.get("data", {}).get("shard_size")),
        "batch_latency_ms": latency if isinstance(latency, dict) else None,
        "peak_memory_gb": this.get("peak_memory_gb"),
    } | {k: run[k] for k in ("gpu_util_mean", "gpu_util_active_mean", "wall_s", "log")}
    row["error"] = run["error"] or (None if summary else f"no summary.json in {out_dir}")
    return row


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _checked(row: dict) -> dict:
    if row["error"] is None and row["rows"] != row["images"]:
        row["error"] = f"{row['rows']} rows written for {row['images']} images (see {row['log']})"
    print(f"  {row_line(row)}", flush=True)
    return row


def _images(data: dict, shards: int | None) -> int:
    return data["images"] if shards is None else shards * data["shard_size"]


def _place(data: dict) -> str:
    """A data set in the labels of runs (their logs and output folders)."""
    return data["image_size"] if data["input"] == "webdataset" else f"folder-{data['image_size']}"


def _too_many(args: BenchmarkArgs, devices: int, gpu_count: int) -> str | None:
    if args.accelerator != "cpu" and gpu_count and devices > gpu_count:
        return f"{devices} devices asked, {gpu_count} GPU(s) here"
    return None


def run_end_to_end(
    args: BenchmarkArgs, name: str, prec: str, data: dict, decode_mode: str | None, devices: int,
    model_rate: float | None, gpu_count: int,
) -> dict:  # fmt: skip
    """One tuned ``predict`` run."""
    shards = shards_to_read(args, data, model_rate, devices)
    label = f"{name}-{prec}-{_place(data)}-{decode_mode or 'default'}-{devices}dev"
    out_dir = args.work / "out" / label
    row: dict[str, Any] = {
        "model": name,
        "input": data["input"],
        "precision": prec,
        "image_size": data["image_size"],
        "decode": decode_mode,
        "devices": devices,
        "num_workers": args.workers(devices),
        "batch_size": args.batch_size,
        "images": _images(data, shards),
        "shards": shards if shards is not None else data["shards"],
        "output_dir": str(out_dir),
    }
    if error := _too_many(args, devices, gpu_count):
        return row | {"images_per_s": None, "error": error}
    options = tuned_options(args, name, prec, data, shards, out_dir, decode_mode, devices)
    return _checked(row | _run_predict(args, label, options, out_dir, devices))


def run_defaults(
    args: BenchmarkArgs, name: str, data: dict, devices: int, tuned: dict | None, gpu_count: int
) -> dict:
    """``predict`` with its defaults, on the images of the tuned run ``tuned`` (the best one) where
    there is one; its ratio to that run is added with the report's other ratios."""
    # The tuned run's images, so that both rates are of the same work (all the shards without one).
    tuned_shards = tuned is not None and data["input"] == "webdataset"
    shards = tuned["shards"] if tuned_shards else shards_to_read(args, data, None, devices)
    label = f"{name}-defaults-{_place(data)}-{devices}dev"
    out_dir = args.work / "out" / label
    row: dict[str, Any] = {
        "model": name,
        "input": data["input"],
        "options": "defaults",
        "image_size": data["image_size"],
        "devices": devices,
        "images": _images(data, shards),
        "shards": shards,
        "output_dir": str(out_dir),
    }
    if error := _too_many(args, devices, gpu_count):
        return row | {"images_per_s": None, "error": error}
    options = default_options(args, name, data, shards, out_dir, devices)
    return _checked(row | _run_predict(args, label, options, out_dir, devices))


def _worker_command(kind: str, request: dict, folder: Path) -> tuple[list[str], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.request.json").write_text(json.dumps(request, indent=2, default=str))
    result = folder / f"{kind}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "clip_fabric.benchmark", kind, str(folder / f"{kind}.request.json")]
    return cmd + [str(result)], result


def run_model_only(args: BenchmarkArgs) -> tuple[list[dict], dict]:
    """Every model and precision in one ``measure.model_only`` process; also what the machine is."""
    batch = args.model_only_batch
    request = {
        "models": [asdict(args.model_for(n)) for n in args.model_names],
        "precisions": args.precisions,
        "tf32": args.tf32,
        "accelerator": args.accelerator,
        "batch_size": batch,
        "seconds": args.model_seconds,
    }
    cmd, result_path = _worker_command("model-only", request, args.work / "runs")
    run = run_process(cmd, args.work / "logs" / "model-only", args.timeout_s * 2, visible_gpus(1))
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    machine = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        **result.get("machine", {}),
    }
    rows = result.get("rows") or [
        {"model": n, "precision": p, "batch_size": batch, "images_per_s": None, "error": run["error"]}
        for n in args.model_names
        for p in args.precisions
    ]
    for row in rows:
        row |= {k: run[k] for k in ("gpu_util_mean", "gpu_util_active_mean", "log")}
        print(f"  {row_line(row)}", flush=True)
    return rows, machine


def run_naive(args: BenchmarkArgs, name: str, data: dict) -> dict:
    """The naive loop on one shard per worker of the same data set, float32, one device."""
    workers = args.workers(1)
    shards = min(data["shards"], max(workers, 1))
    label = f"naive-{name}-{data['image_size']}"
    request = {
        "model": asdict(args.model_for(name)),
        "urls": [f"{data['dir']}/{i:06d}.tar" for i in range(shards)],
        "batch_size": args.naive_batch_size,
        "num_workers": workers,
        "accelerator": args.accelerator,
        "seconds": args.naive_seconds,
        "output": str(args.work / "out" / f"{label}.npy"),
    }
    cmd, result_path = _worker_command("naive", request, args.work / "runs" / label)
    run = run_process(cmd, args.work / "logs" / label, args.timeout_s, visible_gpus(1))
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    row = {
        "model": name,
        "precision": "32-true",
        "image_size": data["image_size"],
        "batch_size": args.naive_batch_size,
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
    print(f"  {row_line(row | {'decode': 'naive'})}", flush=True)
    return row


def run_data_path(args: BenchmarkArgs, name: str, data: dict, decode_mode: str | None, shards: int) -> dict:
    """The data path alone (``measure.data_path``) on the first ``shards`` shards of a data set, one
    device: the most images/s the end-to-end runs on those images can reach."""
    label = f"data-path-{name}-{_place(data)}-{decode_mode or 'default'}"
    request = {
        "model": asdict(args.model_for(name)),
        "source": shard_pattern(data, shards),
        "decode": decode_mode,
        "batch_size": args.model_only_batch,
        "num_workers": args.workers(1),
        "accelerator": args.accelerator,
    }
    cmd, result_path = _worker_command("data-path", request, args.work / "runs" / label)
    run = run_process(cmd, args.work / "logs" / label, args.timeout_s, visible_gpus(1))
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    row = {
        "model": name,
        "image_size": data["image_size"],
        "decode": decode_mode,
        "images_available": shards * data["shard_size"],
        **result,
        "error": run["error"] or (None if result else "no result"),
    } | {k: run[k] for k in ("gpu_util_mean", "gpu_util_active_mean", "wall_s", "log")}
    print(f"  data path alone: {row_line(row)}", flush=True)
    return row
