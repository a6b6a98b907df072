"""The device stage of the image path: JPEG bytes to model inputs in batches, on the GPU.

A batch's JPEGs are decoded together (nvJPEG through torchvision), images of one size are resized
together (bicubic, antialiased: torch's match of PIL's filter), center-cropped and normalised as
open_clip's preprocess does, and placed among the rows the workers already decoded on the CPU.

A JPEG the batched decode rejects is retried alone, then on the CPU; one that fails there too leaves
its batch as an error record. The stage runs on any device (the tests run it on the CPU).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from clip_fabric.data.decode import CpuDecoder, ImageSpec

log = logging.getLogger(__name__)
# Resize at most this many input pixels x channels at once (float32: 4 bytes each), so a batch of large
# photos of one size is resized in chunks rather than all at once.
RESIZE_CHUNK_VALUES = 256 * 1024 * 1024


def gpu_decode_available(device: torch.device) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` (a CUDA build with nvJPEG)."""
    if device.type != "cuda":
        return False
    try:
        from clip_fabric.data.synthetic import synthetic_jpeg

        data = torch.frombuffer(bytearray(synthetic_jpeg(0, (16, 16))), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_jpeg([data], device=device)
        return True
    except (RuntimeError, NotImplementedError) as err:
        log.warning("GPU JPEG decode unavailable on %s (%s): decoding on the CPU", device, err)
        return False


class DeviceImageDecoder:
    """Completes a batch's ``images`` on ``device`` from its packed JPEG bytes."""

    def __init__(self, spec: ImageSpec, cpu: CpuDecoder, device: torch.device) -> None:
        self.spec = spec
        self.cpu = cpu
        self.device = torch.device(device)

    def __call__(self, batch: dict) -> dict:
        """``batch`` with ``images`` on the device for all its rows; rows whose JPEG no decoder reads move
        to ``errors``."""
        if batch.get("jpeg_data") is None:
            return batch
        rows = len(batch["rows"])
        height, width = self.spec.crop
        images = torch.empty(rows, 3, height, width, device=self.device)
        if batch["images"] is not None:
            images[batch["image_rows"].to(self.device)] = batch["images"].to(self.device, non_blocking=True)
        blobs = list(torch.split(batch["jpeg_data"], batch["jpeg_lengths"].tolist()))
        decoded, failed = self._decode(blobs)
        jpeg_rows = batch["jpeg_rows"].tolist()
        done = [i for i in range(len(blobs)) if i not in failed]
        if done:
            images[torch.tensor([jpeg_rows[i] for i in done], device=self.device)] = self._resize(
                [decoded[i] for i in done]
            )
        out = {k: v for k, v in batch.items() if k not in ("jpeg_data", "jpeg_lengths", "jpeg_rows")}
        out["images"] = images
        out.pop("image_rows", None)
        if failed:
            out = self._drop(out, {jpeg_rows[i]: reason for i, reason in failed.items()})
        return out

    def _decode(self, blobs: list[Tensor]) -> tuple[dict[int, Tensor], dict[int, str]]:
        """Decoded CHW uint8 images by position, and the reasons of those that failed everywhere."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for its decoders
            try:
                self._settle()
                decoded = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
                self._settle()
                return dict(enumerate(decoded)), {}
            except RuntimeError as err:
                log.warning("batched JPEG decode failed (%s): decoding the batch one image at a time", err)
            decoded, failed = {}, {}
            for i, blob in enumerate(blobs):
                try:
                    self._settle()
                    decoded[i] = decode_jpeg(blob, mode=ImageReadMode.RGB, device=self.device)
                    self._settle()
                except RuntimeError:
                    try:  # the CPU decoder tolerates some files nvJPEG refuses
                        decoded[i] = self.cpu.image(blob.numpy().tobytes())
                    except Exception as err:  # noqa: BLE001 - a broken file is a record, not a crash
                        failed[i] = f"undecodable image: {type(err).__name__}: {err}"
        return decoded, failed

    def _settle(self) -> None:
        """Let nothing else run on the device around an nvJPEG decode.

        torchvision allocates the decoded images from the current stream's memory pool but writes them
        on a stream of its own, reading the batch's pinned bytes there too. Memory the current stream
        freed while its kernels are still queued (the previous batch's images and activations) can be
        handed to nvJPEG and overwritten before those kernels read it, and the pinned bytes can be
        reused by the DataLoader before nvJPEG has read them. 2-GPU runs on H100s without these waits
        wrote image embeddings that differed between runs (cosine down to 0.91). Waiting costs the
        overlap of decoding with the previous batch's encoder: see docs/benchmarks.md.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _resize(self, images: list[Tensor]) -> Tensor:
        """Preprocessed images in the order given: same-size images resized together."""
        out = torch.empty(len(images), 3, *self.spec.crop, device=self.device)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[tuple(image.shape) if image.dtype == torch.uint8 else ("cpu",)].append(i)
        for shape, members in groups.items():
            if shape == ("cpu",):  # fell back to the CPU decoder: already preprocessed
                out[members] = torch.stack([images[i] for i in members]).to(self.device)
                continue
            step = max(1, RESIZE_CHUNK_VALUES // (shape[0] * shape[1] * shape[2]))
            for start in range(0, len(members), step):
                part = members[start : start + step]
                out[part] = self.spec.apply(torch.stack([images[i] for i in part]))
        return out

    def _drop(self, batch: dict, reasons: dict[int, str]) -> dict:
        keep = [i for i in range(len(batch["rows"])) if i not in reasons]
        index = torch.tensor(keep, dtype=torch.int64)
        batch["errors"] = batch["errors"] + [
            {"key": batch["rows"][i]["key"], "source": batch.get("source", ""), "reason": reason}
            for i, reason in sorted(reasons.items())
        ]
        batch["rows"] = [batch["rows"][i] for i in keep]
        batch["images"] = batch["images"][index.to(self.device)]
        if batch["texts"] is not None:
            batch["texts"] = batch["texts"][index]
        return batch
