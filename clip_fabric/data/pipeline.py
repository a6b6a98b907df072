"""A rank's batches, from its shards to tensors on its device: the one place that assembles
source -> decode (DataLoader workers) -> batch -> device (and GPU decode), for predict and evaluate.

The hop to the device runs in line, in the main thread. The overlap comes from the order of work in the
predict loop: the batch after this one is read and decoded here while the GPU still runs this batch's
encoder (kernel launches return at once, and the loop waits for a batch's results one batch later).
A background thread with its own CUDA stream was tried first and hung at scale on an H100 (40k images,
15 workers, batches of 1,000), so the simpler order is kept."""

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
from clip_fabric.data.batch import Batch
from clip_fabric.data.decode import CpuDecoder, ImageSpec
from clip_fabric.data.device_decode import DeviceImageDecoder, gpu_decode_available
from clip_fabric.data.sizing import resolve_num_workers
from clip_fabric.data.stream import ShardStream
from clip_fabric.encode import DEFAULT_BATCH_SIZE, auto_batch_size
from clip_fabric.modes import Mode
from clip_fabric.preemption import worker_shield
from clip_fabric.strategies import hooks

log = logging.getLogger(__name__)
# Room kept per sample for what the GPU decoder holds besides the model's activations: the decoded
# image and its float copy for photos up to about 1 megapixel, and the batches in flight.
GPU_DECODE_BYTES_PER_SAMPLE = 16 * 1024 * 1024


def resolve_decode(decode: str, device: torch.device, preprocess: Callable) -> str:
    """The decode path that runs. ``auto`` is the fastest path measured within 1e-5 cosine distance of
    open_clip's own preprocess (docs/benchmarks.md): ``gpu`` (3e-6) on the GPUs it was measured on,
    Hopper (H100, H200: 3x the ``cpu`` path for ViT-B-32), whose hardware JPEG decoder torchvision uses;
    ``cpu`` (2e-7) everywhere else. For a slow tower (ViT-L-14) on one GPU with 16 workers, ``cpu`` was
    8% faster in steady state, but slower to start, and on two GPUs with 32 workers each it scaled to
    only 67% of linear. ``gpu`` costs such a tower a bounded 7% of its GPU time and scaled to four GPUs
    with ViT-B-32, so ``auto`` keeps it; ``--data.decode cpu`` is there to try for a slow tower."""
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
        return "gpu" if measured and gpu_decode_available(device) else "cpu"
    return decode


def choose_batch_size(
    fabric: Fabric,
    module: nn.Module,
    model: nn.Module,
    data: DataArgs,
    towers: frozenset[str],
    decode: str,
) -> int:
    """``--data.batch_size``, or what ``auto`` finds with one probe batch of the ``towers`` that run on
    every device holding weights, the smallest over all ranks. A strategy whose forward needs a partner
    rank (``local_forward = False``) cannot probe alone and gets the default."""
    if data.batch_size != "auto":
        return data.batch_size
    if not hooks(fabric.strategy).local_forward:
        fabric.print(f"clip_fabric: batch size {DEFAULT_BATCH_SIZE} (auto cannot probe a paired forward)")
        return DEFAULT_BATCH_SIZE
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    held = {p.device for p in model.parameters() if p.device.type == fabric.device.type}
    devices = [fabric.device, *sorted(held - {fabric.device}, key=str)]  # two under model_parallel

    def inputs(n: int) -> tuple:
        return (
            torch.zeros(n, 3, size, size, device=devices[0]) if "image" in towers else None,
            torch.zeros(n, model.context_length, dtype=torch.int64, device=devices[0])
            if "text" in towers
            else None,
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
    mode: Mode,
    local_ranks: int = 1,
) -> Iterator[Batch]:
    """Batches of ``shards`` with ``images``/``texts`` on ``device`` as ``mode`` needs them; ``decode`` as
    resolved; ``local_ranks`` share the node's CPUs for ``--data.num_workers auto``."""
    # DCT scaling only where asked for, and never beside the GPU decoder (both keep 1e-5 without it).
    # The cpu path hands uint8 pixels to a GPU, which normalises them in microseconds; a CPU run keeps
    # that step in the workers, beside the decoding, rather than in its one main process.
    cpu = CpuDecoder(
        preprocess, tokenizer, data.max_image_pixels, mode="pil" if decode == "pil" else "cpu",
        scale_jpegs=data.dct_scaling and decode == "cpu", normalise_on_device=device.type != "cpu",
    )  # fmt: skip
    gpu = decode == "gpu" and mode.reads_images
    stream = ShardStream(
        source, shards, cpu, batch_size, mode.reads_images, mode.caption_required, gpu_jpeg=gpu,
        cpu_share=data.cpu_decode_share,
    )  # fmt: skip
    # Decoded images cross from the workers through shared memory, which caps --data.num_workers auto:
    # uint8 pixels on the cpu path for a GPU (3 bytes a pixel), float32 model input otherwise (12); JPEG
    # bytes for the GPU decoder are small. A worker reads whole shards: no more workers than there are.
    batch_bytes = (
        (3 if cpu.normalise_on_device and cpu.mode == "cpu" else 12)
        * batch_size
        * cpu.spec.crop[0]
        * cpu.spec.crop[1]
        if cpu.spec and mode.reads_images and not gpu
        else 0
    )
    workers = min(resolve_num_workers(data.num_workers, local_ranks, batch_bytes), len(shards))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_shield(),
    )
    stage = DeviceImageDecoder(cpu.spec, cpu, device) if gpu else None
    normalise = cpu.spec.normalise if cpu.spec is not None else None
    for batch in loader:
        yield stage(batch) if stage is not None else batch.to(device, normalise)
