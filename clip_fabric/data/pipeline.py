"""A rank's batches, from its shards to tensors on its device: the one place that assembles
source -> decode (DataLoader workers) -> batch -> device (and GPU decode), for predict and evaluate."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from clip_fabric.config import DataArgs
from clip_fabric.data import Shard, Source
from clip_fabric.data.decode import CpuDecoder, ImageSpec
from clip_fabric.data.gpu import DeviceImageDecoder, gpu_decode_available
from clip_fabric.data.prefetch import device_stage
from clip_fabric.data.stream import ShardStream
from clip_fabric.encode import auto_batch_size
from clip_fabric.preemption import ignore_stop_signals

log = logging.getLogger(__name__)
# Room kept per sample for what the GPU decoder holds besides the model's activations: the decoded
# image and its float copy for photos up to about 1 megapixel, and the batches in flight.
GPU_DECODE_BYTES_PER_SAMPLE = 16 * 1024 * 1024


def resolve_decode(decode: str, device: torch.device, preprocess: Callable) -> str:
    """The decode path that runs. ``auto`` is the fastest path measured within 1e-5 cosine distance of
    open_clip's own preprocess: ``cpu`` (2e-7 on 500x375 JPEGs, docs/benchmarks.md) for now; ``gpu``
    (3e-6) joins once its synchronisation fix (clip_fabric.data.gpu) has run at scale on a GPU."""
    if decode == "gpu":
        if device.type != "cuda":
            raise ValueError(f"--data.decode gpu needs a CUDA device, this rank has {device}; use cpu")
        if not gpu_decode_available(device):
            raise ValueError("--data.decode gpu: torchvision cannot decode JPEGs on this GPU; use cpu")
    if decode in ("gpu", "cpu", "auto") and ImageSpec.from_preprocess(preprocess) is None:
        log.warning("this model's preprocess is not resize+center-crop: decoding with it on the CPU")
        return "pil"
    return "cpu" if decode == "auto" else decode


def choose_batch_size(
    data: DataArgs,
    encode: Callable,
    image_size: int | None,
    context_length: int | None,
    devices: list[torch.device],
    decode: str,
) -> int:
    """``--data.batch_size``, or the size ``auto`` picks on ``devices`` (the first gets the inputs)."""
    if data.batch_size != "auto":
        return data.batch_size

    def inputs(n: int) -> tuple:
        images = torch.zeros(n, 3, image_size, image_size, device=devices[0]) if image_size else None
        texts = (
            torch.zeros(n, context_length, dtype=torch.int64, device=devices[0]) if context_length else None
        )
        return images, texts

    extra = GPU_DECODE_BYTES_PER_SAMPLE if decode == "gpu" else 0
    return auto_batch_size(encode, inputs, devices, extra_bytes_per_sample=extra)


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
