"""``benchmark``: images/s of the model alone, of the whole pipeline from JPEG shards to embeddings on
disk, of ``predict`` with its plain defaults, and of a naive loop, measured in one run; a table, a JSON
report and a PNG chart (docs/benchmarks.md).

The command itself only orchestrates; it never touches a GPU. Each measurement runs in its own process,
so that one run cannot leave memory, threads or a CUDA context behind for the next:

- ``options.py``: the options (one dataclass), checked before any work;
- ``shards.py``: the generated JPEGs, as webdataset shards and as a folder, cached in ``--work_dir``;
- ``runs.py``: each measurement from the command's side (its process, its report row); end to end is
  ``python -m clip_fabric predict`` exactly as a user runs it, tuned or with no performance options;
- ``measure.py``: what runs inside the model-only, data-path-alone and naive-loop processes;
- ``processes.py``: a process with logs, a time limit and ``nvidia-smi`` sampling;
- ``report.py``: ratios, the JSON, the tables and the chart.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from clip_fabric.benchmark.options import BenchmarkArgs, check_names
from clip_fabric.benchmark.report import best_tuned, format_tables, save
from clip_fabric.benchmark.runs import (
    check_predict_options,
    run_data_path,
    run_defaults,
    run_end_to_end,
    run_model_only,
    run_naive,
    shards_to_read,
)
from clip_fabric.benchmark.shards import make_dataset, make_folder
from clip_fabric.benchmark.shards import synthetic_photo as synthetic_photo  # docs/measurements/ scripts

RANDOM_WEIGHTS = (
    "random-init weights (no pretrained weights are loaded): the compute, so the speed, is that of "
    "trained weights; the embeddings themselves are meaningless"
)


def setup(**options: Any) -> dict:
    """Images/s of the model alone, of predict end to end, and of a naive loop, measured in one run.

    Model only: synthetic tensors already on the device. Data path alone: predict's loader and device
    stage with no model, the bound of the end-to-end runs on the same shards. End to end: ``predict``
    from JPEG webdataset shards that this command generates (and caches in ``work_dir``) to embeddings
    on disk; with ``--folder_images``, also from a folder of JPEG files; with ``--defaults true``, also
    ``predict`` without any performance option beside each tuned run. Naive: the same shards through PIL
    ``preprocess`` in DataLoader workers and a float32 model. With batch latency, peak memory and GPU
    utilisation. Prints tables, writes a JSON report and a PNG chart (docs/benchmarks.md). Weights are
    random (``--model.pretrained`` for real ones): the speed is that of trained weights.

    The options are the fields of ``BenchmarkArgs`` (jsonargparse reads them through ``**options``).

    Returns:
        The report (also written to ``--output``).
    """
    args = BenchmarkArgs(**options)
    check_names(args)
    check_predict_options(args)
    return run(args)


def run(args: BenchmarkArgs) -> dict:
    """Generate (or reuse) the images, then measure: the model alone (every model), then per model and
    data set its tuned end-to-end runs, the data path alone, its run with predict's defaults and its
    naive loop. The report is saved after each measurement, so that a run cut short keeps them."""
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    datasets = _datasets(args)
    print(f"clip_fabric benchmark: model only ({', '.join(args.model_names)})", flush=True)
    model_only, machine = run_model_only(args)
    report = _new_report(args, datasets, model_only, machine)

    def checkpoint() -> None:
        save(report, args.output_path, args.chart_path, started, final=False)

    checkpoint()
    for name in args.model_names:
        for data in datasets:
            _measure(args, report, name, data, checkpoint)
    save(report, args.output_path, args.chart_path, started, final=True)
    print(format_tables(report))
    print(
        f"clip_fabric benchmark: report {args.output_path}, chart {args.chart_path} "
        f"({report['seconds']:.0f} s)"
    )
    return report


def _datasets(args: BenchmarkArgs) -> list[dict]:
    """The tar shards of every image size, then (with ``--folder_images``) its folder of files."""
    granule = args.total_workers()
    datasets = [make_dataset(args.work, size, count, args.shard_size, granule) for size, count in args.sets]
    if args.folder_images:
        datasets += [make_folder(args.work, size, args.folder_images, granule) for size, _ in args.sets]
    return datasets


def _new_report(args: BenchmarkArgs, datasets: list[dict], model_only: list[dict], machine: dict) -> dict:
    return {
        "command": _command_line(),
        "weights": "pretrained: " + args.model.pretrained if args.model.pretrained else RANDOM_WEIGHTS,
        "machine": machine,
        "options": args.as_report(),
        "datasets": datasets,
        "model_only": model_only,
        "end_to_end": [],
        "defaults": [],
        "naive": [],
        "data_path": [],
    }


def _measure(
    args: BenchmarkArgs, report: dict, name: str, data: dict, checkpoint: Callable[[], None]
) -> None:
    """One model on one data set: the tuned runs first, as the defaults run is compared with the best
    of them; the data path alone and the naive loop read tar shards only."""
    gpu_count = report["machine"].get("cuda_devices") or 0
    for prec in args.precisions:
        rate = _model_rate(report, name, prec)
        for decode_mode in args.decodes:
            for count in args.device_counts:
                row = run_end_to_end(args, name, prec, data, decode_mode, count, rate, gpu_count)
                report["end_to_end"].append(row)
                checkpoint()
    if data["input"] == "webdataset":  # the bound of the runs above: no model, one device
        shards = shards_to_read(args, data, _model_rate(report, name), 1) or data["shards"]
        for decode_mode in args.decodes:
            report["data_path"].append(run_data_path(args, name, data, decode_mode, shards))
        checkpoint()
    for count in args.device_counts if args.defaults else []:
        tuned = best_tuned(report, name, data["input"], data["image_size"], count)
        report["defaults"].append(run_defaults(args, name, data, count, tuned, gpu_count))
        checkpoint()
    if args.naive and data["input"] == "webdataset":
        report["naive"].append(run_naive(args, name, data))
        checkpoint()


def _model_rate(report: dict, name: str, precision: str | None = None) -> float | None:
    """The model-only images/s of a model under ``precision`` (None: its first precision's)."""
    rows = (r for r in report["model_only"] if r["model"] == name and precision in (None, r["precision"]))
    return next((r["images_per_s"] for r in rows), None)


def _command_line() -> str | None:
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        return "python -m clip_fabric " + shlex.join(sys.argv[1:])
    return None
