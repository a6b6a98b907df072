"""A rank's batches, from its shards to tensors on its device: the one place that assembles
source -> decode (DataLoader workers) -> batch -> device (and GPU decode), for predict and evaluate."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.distributed import ReduceOp
from torch.utils.data import DataLoader

from clip_fabric.config import DataArgs
from clip_fabric.data import Shard, Source
from clip_fabric.data.decode import CpuDecoder, ImageSpec
from clip_fabric.data.gpu import DeviceImageDecoder, gpu_decode_available
from clip_fabric.data.prefetch import device_stage
from clip_fabric.data.stream import ShardStream
from clip_fabric.encode import DEFAULT_BATCH_SIZE, auto_batch_size
from clip_fabric.preemption import ignore_stop_signals

log = logging.getLogger(__name__)
# Room kept per sample for what the GPU decoder holds besides the model's activations: the decoded
# image and its float copy for photos up to about 1 megapixel, and the batches in flight.
GPU_DECODE_BYTES_PER_SAMPLE = 16 * 1024 * 1024
# Measured on one H100 with 16 cores (docs/benchmarks.md, 2026-11-25): the ``cpu`` path decoded about
# 255 web-size (500x375) JPEGs per second per DataLoader worker, and ViT towers ran at about 400 TFLOP/s
# in bf16 (ViT-B-32 392, ViT-L-14 461).
CPU_DECODE_IMAGES_PER_WORKER = 255
HOPPER_TOWER_FLOPS = 400e12


def vision_flops(model: nn.Module | None) -> float | None:
    """Matmul FLOPs per image of an open_clip ViT image tower, 2 x parameters x tokens (attention adds a
    few percent): ViT-B-32 8.8 GFLOP, ViT-L-14 156; None for other towers."""
    visual = getattr(model, "visual", None)
    grid = getattr(visual, "grid_size", None)
    if grid is None:
        return None
    return 2.0 * sum(p.numel() for p in visual.parameters()) * (grid[0] * grid[1] + 1)


def resolve_decode(
    decode: str,
    device: torch.device,
    preprocess: Callable,
    model: nn.Module | None = None,
    num_workers: int = 0,
) -> str:
    """The decode path that runs. ``auto`` is the fastest path measured within 1e-5 cosine distance of
    open_clip's own preprocess (docs/benchmarks.md): ``cpu`` (2e-7) except on the GPUs ``gpu`` (3e-6)
    was measured on, Hopper (H100, H200), whose hardware JPEG decoder torchvision uses. There ``gpu``
    feeds a small tower 3x faster than ``cpu``, but its decoding takes GPU time from the tower; where the
    ``num_workers`` DataLoader workers decode on the CPU faster than the tower encodes (ViT-L-14 with 16
    workers: 96% of model only on ``cpu``, 88% on ``gpu``), ``cpu`` is the faster path. That holds for
    long jobs: the workers take seconds to fill their first batches, so over a job of a few shards per
    worker ``gpu`` finishes sooner."""
    if decode == "gpu":
        if device.type != "cuda":
            raise ValueError(f"--data.decode gpu needs a CUDA device, this rank has {device}; use cpu")
        if not gpu_decode_available(device):
            raise ValueError("--data.decode gpu: torchvision cannot decode JPEGs on this GPU; use cpu")
    if decode in ("gpu", "cpu", "auto") and ImageSpec.from_preprocess(preprocess) is None:
        log.warning("this model's preprocess is not resize+center-crop: decoding with it on the CPU")
        return "pil"
    if decode == "auto":
        measured = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        if not (measured and gpu_decode_available(device)):
            return "cpu"
        flops = vision_flops(model)
        if flops and HOPPER_TOWER_FLOPS / flops <= CPU_DECODE_IMAGES_PER_WORKER * num_workers:
            return "cpu"
        return "gpu"
    return decode


def choose_batch_size(
    fabric: Fabric,
    module: nn.Module,
    model: nn.Module,
    data: DataArgs,
    images: bool,
    texts: bool,
    decode: str,
) -> int:
    """``--data.batch_size``, or what ``auto`` finds with one probe batch of the towers that run (images
    and/or texts) on every device holding weights, the smallest over all ranks. A strategy whose forward
    needs a partner rank (``local_forward = False``) cannot probe alone and gets the default."""
    if data.batch_size != "auto":
        return data.batch_size
    if not getattr(fabric.strategy, "local_forward", True):
        fabric.print(f"clip_fabric: batch size {DEFAULT_BATCH_SIZE} (auto cannot probe a paired forward)")
        return DEFAULT_BATCH_SIZE
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    held = {p.device for p in model.parameters() if p.device.type == fabric.device.type}
    devices = [fabric.device, *sorted(held - {fabric.device}, key=str)]  # two under model_parallel

    def inputs(n: int) -> tuple:
        return (
            torch.zeros(n, 3, size, size, device=devices[0]) if images else None,
            torch.zeros(n, model.context_length, dtype=torch.int64, device=devices[0]) if texts else None,
        )

    extra = GPU_DECODE_BYTES_PER_SAMPLE if decode == "gpu" else 0
    with torch.inference_mode():
        found = auto_batch_size(module, inputs, devices, extra_bytes_per_sample=extra)
    found = int(fabric.all_reduce(torch.tensor(found, device=fabric.device), reduce_op=ReduceOp.MIN))
    fabric.print(f"clip_fabric: batch size {found} (auto)")
    return found


def device_batches(
    source: Source,
    shards: list[Shard],
    preprocess: Callable,
    tokenizer: Callable,
    data: DataArgs,
    batch_size: int,
    device: torch.device,
    decode: str,
    need_image: bool,
    need_text: bool,
) -> Iterator[dict]:
    """Batches of ``shards`` with ``images``/``texts`` on ``device``; ``decode`` as resolved."""
    # DCT scaling only where asked for, and never beside the GPU decoder (both keep 1e-5 without it).
    cpu = CpuDecoder(
        preprocess, tokenizer, data.max_image_pixels, mode="pil" if decode == "pil" else "cpu",
        scale_jpegs=data.dct_scaling and decode == "cpu",
    )  # fmt: skip
    gpu = decode == "gpu" and need_image
    stream = ShardStream(
        source, shards, cpu, batch_size, need_image, need_text, gpu_jpeg=gpu, cpu_share=data.cpu_decode_share
    )
    workers = min(data.num_workers, len(shards))  # a worker reads whole shards: no more than there are
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
    )
    stage = DeviceImageDecoder(cpu.spec, cpu, device) if gpu else None
    return device_stage(loader, device, stage)
