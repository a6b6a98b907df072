"""What runs inside the measurement processes that the command starts: the model alone on synthetic
tensors, and the naive loop. Each reads a JSON request and writes a JSON result
(``python -m clip_fabric.benchmark KIND REQUEST RESULT``), so that one measurement cannot leave memory,
threads or a CUDA context behind for the next. (The end-to-end run is ``predict`` itself: ``runs.py``.)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from clip_fabric.config import ModelArgs


def model_only(request: dict) -> dict:
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

    from clip_fabric.model import Embedder
    from clip_fabric.verify_precision import _timed as timed

    fabric = build_fabric(request["accelerator"], prec, request["tf32"])
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


def build_fabric(accelerator: str, precision: str, tf32: bool):
    """The one-device Fabric of a model-only measurement under one precision plugin."""
    from clip_fabric import launch

    return launch.build_fabric(accelerator, devices=1, precision=precision, tf32=tf32)


def _identity(value: Any) -> Any:
    return value


def naive(request: dict) -> dict:
    """The loop of the article's benchmark and of a typical user: webdataset + open_clip's PIL
    ``preprocess`` in DataLoader workers, a float32 model, ``encode_image``, normalise, ``.cpu()``,
    and the embeddings saved with ``np.save`` at the end. Timed from the first ``next(loader)`` to the
    saved file, like predict's own throughput; a run stopped at the time limit is measured up to its
    best point in its second half (``_late_rate``)."""
    import numpy as np
    import torch

    model, preprocess, device = _naive_model(request)
    loader = _naive_loader(request, preprocess)
    start = time.perf_counter()
    embeddings, progress, stopped = _naive_loop(model, loader, device, start, request["seconds"])
    del loader  # its workers stop here
    array = torch.cat(embeddings).numpy()
    Path(request["output"]).parent.mkdir(parents=True, exist_ok=True)
    np.save(request["output"], array)
    seconds = time.perf_counter() - start
    cuda = device.type == "cuda"
    return {
        "images": len(array),
        "seconds": round(seconds, 3),
        "images_per_s": round(_late_rate(progress) if stopped else len(array) / seconds, 1),
        "stopped_at_time_limit": stopped,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "output": request["output"],
    }


def _naive_model(request: dict):
    """(float32 model in eval mode on its device, open_clip's PIL ``preprocess``, the device)."""
    import open_clip
    import torch

    from clip_fabric.model import register_config

    args = ModelArgs(**request["model"])
    register_config(args)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.name, pretrained=args.pretrained, cache_dir=args.cache_dir
    )
    use_cuda = request["accelerator"] != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    return model.to(device).eval(), preprocess, device


def _naive_loader(request: dict, preprocess):
    """webdataset's PIL decode and ``preprocess`` in DataLoader workers, at most one per shard."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    dataset = (
        wds.WebDataset(request["urls"], shardshuffle=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(preprocess, _identity)
    )
    workers = min(request["num_workers"], len(request["urls"]))
    return DataLoader(dataset, batch_size=request["batch_size"], num_workers=workers)


def _naive_loop(model, loader, device, start: float, limit_s: float) -> tuple[list, list, bool]:
    """(the normalised embeddings on the CPU per batch, (elapsed s, images so far) after each batch,
    whether the time limit stopped it)."""
    import torch

    embeddings, progress, count = [], [], 0
    with torch.no_grad():
        for images, _captions in loader:
            features = model.encode_image(images.to(device))
            features /= features.norm(dim=-1, keepdim=True)
            embeddings.append(features.cpu())
            count += len(features)
            elapsed = time.perf_counter() - start
            progress.append((elapsed, count))
            if elapsed > limit_s:
                return embeddings, progress, True
    return embeddings, progress, False


def _late_rate(progress: list[tuple[float, int]]) -> float:
    """The rate of a run cut at the time limit. Workers that start together deliver their batches in
    bursts; a run cut at the time limit may end just after a burst began, which would understate its
    rate. The best images/elapsed of the second half of the run is the rate at the end of a burst: the
    cut cannot count against it."""
    return max(n / t for t, n in progress if t >= progress[-1][0] / 2)


def data_path(request: dict) -> dict:
    """The data path alone: predict's own loader (``DeviceBatches``: workers, decode, the device stage)
    over the shards, with no model, timed from its first batch on the device to its last (a device
    synchronisation at each end), as predict's steady rate is."""
    import time

    import torch

    from clip_fabric.config import DataArgs
    from clip_fabric.data import build_source
    from clip_fabric.data.paths import resolve_decode
    from clip_fabric.data.pipeline import DeviceBatches
    from clip_fabric.model import load_model
    from clip_fabric.modes import MODES

    _, preprocess, tokenizer = load_model(ModelArgs(**request["model"]))
    cuda = request["accelerator"] != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data = DataArgs(format="webdataset", source=request["source"], num_workers=request["num_workers"],
                    decode=request["decode"] or "auto")  # fmt: skip
    source = build_source(data)
    decode = resolve_decode(data.decode, device, preprocess)
    batches = DeviceBatches(source, source.shards(), preprocess, tokenizer, data, request["batch_size"],
                            device, decode, MODES["image"])  # fmt: skip
    rows = first = 0
    start = None
    for batch in batches:
        if start is None:
            sync()
            start, first = time.perf_counter(), len(batch.rows)
        rows += len(batch.rows)
    sync()
    seconds = time.perf_counter() - start if start is not None else 0.0
    rate = (rows - first) / seconds if seconds > 0 and rows > first else None
    return {
        "images": rows,
        "images_per_s": round(rate, 1) if rate else None,
        "decode_used": decode.name,
        "jpeg_library": batches.jpeg_library,
        "num_workers_used": batches.workers,
    }


def worker_main(argv: list[str]) -> int:
    """``python -m clip_fabric.benchmark {model-only|naive|data-path} REQUEST.json RESULT.json``: read the
    request the command wrote, measure, write the result for the command to read."""
    kind, request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    result = {"model-only": model_only, "naive": naive, "data-path": data_path}[kind](request)
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0
