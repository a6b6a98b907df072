"""The decode paths of ``--data.decode``, each one object chosen once per run (``resolve_decode``), as
``modes.Mode`` is for ``--mode``: the rest of the pipeline asks the path, never compares its name.

- ``pil``: open_clip's own preprocess on a full PIL decode in the workers: the reference, bit for bit.
- ``cpu``: the same steps on uint8 tensors in the workers (``decode.CpuDecoder``).
- ``gpu``: the workers check JPEGs and pass their bytes; the device decodes and resizes them in batches
  (``device_decode``), beside a share the workers decode as ``cpu`` does (``balance``).
- ``none``: a mode that reads no image (``--mode text``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
# Room kept per sample for what the GPU decoder holds besides the model's activations: the decoded
# image and its float copy for photos up to about 1 megapixel, and the batches in flight.
GPU_DECODE_BYTES_PER_SAMPLE = 16 * 1024 * 1024


@dataclass(frozen=True)
class DecodePath:
    """One ``--data.decode`` path, as resolved for this run."""

    name: str
    worker_mode: str  # what CpuDecoder runs in the workers: "cpu" (uint8 tensors) or "pil"
    on_device: bool = False  # JPEGs travel as bytes and are decoded on the device
    scales_jpegs: bool = False  # --data.dct_scaling applies (the cpu path alone)
    device_bytes_per_sample: int = 0  # device memory the batch-size probe keeps free per sample

    @property
    def reads_images(self) -> bool:
        return self.name != "none"


PATHS = {
    "pil": DecodePath("pil", "pil"),
    "cpu": DecodePath("cpu", "cpu", scales_jpegs=True),
    "gpu": DecodePath("gpu", "cpu", on_device=True, device_bytes_per_sample=GPU_DECODE_BYTES_PER_SAMPLE),
    "none": DecodePath("none", "cpu"),
}


def resolve_decode(decode: str, device: torch.device, preprocess: Callable) -> DecodePath:
    """The decode path that runs. ``auto`` is the fastest path measured within 1e-5 cosine distance of
    open_clip's own preprocess: ``gpu`` on the GPUs it was measured on, Hopper (H100, H200), where
    nvImageCodec (the ``gpu-jpeg`` extra) decodes on the hardware JPEG engines; ``cpu`` everywhere else,
    and on Hopper without nvImageCodec, since torchvision's nvJPEG alone misses 1e-5 on photo-like JPEGs
    (figures: docs/measurements/2026-12-04-photo-speed/). ``--data.decode`` names either."""
    import torch

    from clip_fabric.data.decode import ImageSpec
    from clip_fabric.data.device_decode import gpu_decode_available, jpeg_library

    if decode == "gpu":
        if device.type != "cuda":
            raise ValueError(f"--data.decode gpu needs a CUDA device, this rank has {device}; use cpu")
        if not gpu_decode_available(device):
            raise ValueError("--data.decode gpu: torchvision cannot decode JPEGs on this GPU; use cpu")
    if decode in ("gpu", "cpu", "auto") and ImageSpec.from_preprocess(preprocess) is None:
        log.warning("this model's preprocess is not resize+center-crop: decoding with it on the CPU")
        return PATHS["pil"]
    if decode == "auto":
        measured = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        if not measured or not gpu_decode_available(device):
            return PATHS["cpu"]
        if jpeg_library(device) != "nvimgcodec":
            log.warning(
                "--data.decode auto: cpu, as torchvision's nvJPEG alone is not within 1e-5 of open_clip on "
                "photos; pip install 'clip_fabric[gpu-jpeg]' for the GPU path (nvImageCodec)"
            )
            return PATHS["cpu"]
        return PATHS["gpu"]
    return PATHS[decode]
