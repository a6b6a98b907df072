"""open_clip's resize and center crop for a batch of images of any mix of sizes, in a few kernels.

The antialiased bicubic resize (PIL's filter, which torch's ``antialias=True`` path reproduces) is
separable: an image ``X`` becomes ``Wh @ X @ Ww.T`` with one coefficient matrix per axis, and the center
crop keeps only some rows of each. The kept rows read only a window of the input (the crop's share of
the longer side, plus the filter's support), so each image is cut to that window first: what is left of
a photo is about square, its shorter side on each axis. The windows are sorted by size and cut into a
few groups whose padding to the group's largest window stays small; each group is then one copy per
image and two batched products in float32 (never TF32), with zero weights over the padding. The
coefficients of the whole batch come from the filter's formula in float64, in one pass.

Every tensor's dtype is explicit: a precision plugin may change torch's default dtype around the
model's forward (bf16-true). The result is rounded to whole values as PIL stores them. It is closer to
the exact float64 resize than torch's float32 ``interpolate`` (one value in about 10^5 is a step away,
against one in 10^3 for interpolate; tests/test_resize.py). It runs on any device; the tests run it on
the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from clip_fabric.data.decode import ImageSpec

PAD_BUDGET = 1.3  # a group's padded values at most this share over the values its windows hold ...
PAD_SLACK_VALUES = 128 * 128  # ... plus this much per image (small windows: fewer groups beat padding)
GROUP_VALUES = 96 * 1024 * 1024  # at most this many padded values (x 3 channels, float32) in one group
BICUBIC_A = -0.5  # the antialiased filter's coefficient (PIL's and torch's; plain bicubic uses -0.75)


def _support(size: int, out: int) -> tuple[float, float, float]:
    """(scale, support, 1/filter scale) of one axis resized from ``size`` to ``out`` pixels."""
    scale = size / out
    return (scale, 2.0 * scale, 1.0 / scale) if scale >= 1 else (scale, 2.0, 1.0)


def window(size: int, out: int, first: int, count: int) -> tuple[int, int]:
    """Input pixels ``[low, high)`` that output pixels ``first .. first + count`` of the resize read."""
    scale, support, _ = _support(size, out)
    low = max(int(scale * (first + 0.5) - support + 0.5), 0)
    high = min(int(scale * (first + count - 1 + 0.5) + support + 0.5), size)
    return low, high


@dataclass(frozen=True)
class Geometry:
    """Where one image's crop comes from, per axis (rows, then columns): input size, resized size,
    the crop's first pixel in the resized image, and the input window ``[low, high)`` it reads."""

    size: tuple[int, int]
    resized: tuple[int, int]
    first: tuple[int, int]
    low: tuple[int, int]
    high: tuple[int, int]

    @classmethod
    def of(cls, spec: ImageSpec, height: int, width: int) -> Geometry:
        resized = spec.resized(height, width)
        first = tuple(int(round((n - c) / 2.0)) for n, c in zip(resized, spec.crop, strict=True))
        spans = [
            window(s, n, f, c) for s, n, f, c in zip((height, width), resized, first, spec.crop, strict=True)
        ]
        return cls((height, width), resized, first, (spans[0][0], spans[1][0]), (spans[0][1], spans[1][1]))

    @property
    def extent(self) -> tuple[int, int]:
        return self.high[0] - self.low[0], self.high[1] - self.low[1]


def taps(sizes: list[tuple[int, int]], count: int) -> int:
    """The most input pixels any one output pixel reads along an axis, over ``(size, out)`` pairs."""
    return max(int(math.ceil(2 * _support(s, o)[1])) + 2 for s, o in sizes) if sizes else 1


def band_weights(table: Tensor, count: int, width: int) -> tuple[Tensor, Tensor]:
    """Coefficients of one axis for many images as bands: ``(index, weight)``, each ``(n, count, width)``.
    ``table`` rows are ``(size, resized, first, low)`` (int64, on the device): output pixel ``j`` of image
    ``i`` is ``sum_t weight[i, j, t] * x[index[i, j, t]]``, with ``index`` counted from the window's
    ``low`` and zero weights past each band. The formula is torch's ``_compute_weights_aa`` (PIL's
    ``precompute_coeffs``), in float64."""
    size, out, first, low = (table[:, k, None, None].double() for k in range(4))
    scale = size / out
    support = torch.where(scale >= 1, 2 * scale, torch.full_like(scale, 2.0))
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    rows = first + torch.arange(count, device=table.device, dtype=torch.float64)[None, :, None]
    center = scale * (rows + 0.5)
    start = (center - support + 0.5).trunc().clamp(min=0)
    stop = torch.minimum((center + support + 0.5).trunc(), size)
    x = start + torch.arange(width, device=table.device, dtype=torch.float64)[None, None, :]
    d = ((x - center + 0.5) * inv).abs()
    a = BICUBIC_A
    w = torch.where(d < 1, ((a + 2) * d - (a + 3)) * d * d + 1, (((d - 5) * d + 8) * d - 4) * a)
    w = torch.where((x < stop) & (d < 2), w, 0.0)
    index = torch.where(w != 0, x - low, 0.0).long()
    return index, (w / w.sum(-1, keepdim=True)).float()


def groups_of(extents: list[tuple[int, int]]) -> list[list[int]]:
    """Positions of the windows in groups of similar size: sorted by height then width, each group grown
    while its padding stays within PAD_BUDGET and its values within GROUP_VALUES."""
    order = sorted(range(len(extents)), key=lambda i: extents[i])
    groups: list[list[int]] = []
    members: list[int] = []
    held = top_h = top_w = 0
    for i in order:
        h, w = extents[i]
        grown_h, grown_w = max(top_h, h), max(top_w, w)
        padded = grown_h * grown_w * (len(members) + 1)
        slack = PAD_SLACK_VALUES * (len(members) + 1)
        fits = padded <= PAD_BUDGET * (held + h * w) + slack and padded <= GROUP_VALUES
        if members and not fits:
            groups.append(members)
            members, held, grown_h, grown_w = [], 0, h, w
        members.append(i)
        held += h * w
        top_h, top_w = grown_h, grown_w
    if members:
        groups.append(members)
    return groups


@dataclass
class Windows:
    """A batch's images cut to their windows and packed into padded float32 groups: what ``BatchResize``
    needs of the decoded images, so that their memory is free again once the copies ran."""

    geometry: list[Geometry]
    groups: list[list[int]]
    padded: list[Tensor]


class BatchResize:
    """``spec``'s resize and center crop on uint8 CHW images of any sizes: float32 NCHW pixels of whole
    values in [0, 255] (``spec.normalise`` makes them model input). ``pack`` copies the images into
    groups (one copy each), ``__call__`` resizes packed groups (a fixed number of kernels per group)."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec

    def pack(self, images: list[Tensor]) -> Windows:
        geometry = [Geometry.of(self.spec, *image.shape[-2:]) for image in images]
        groups = groups_of([g.extent for g in geometry])
        padded = []
        for members in groups:
            h = max(geometry[i].extent[0] for i in members)
            w = max(geometry[i].extent[1] for i in members)
            block = torch.zeros(len(members), 3, h, w, dtype=torch.float32, device=images[0].device)
            for k, i in enumerate(members):
                (y0, x0), (y1, x1) = geometry[i].low, geometry[i].high
                window = images[i][:3, y0:y1, x0:x1]  # grey: one channel, repeated; alpha: dropped
                block[k, :, : y1 - y0, : x1 - x0].copy_(window.expand(3, -1, -1))
            padded.append(block)
        return Windows(geometry, groups, padded)

    def __call__(self, packed: Windows | list[Tensor]) -> Tensor:
        if not isinstance(packed, Windows):
            packed = self.pack(packed)
        device = packed.padded[0].device
        crop_h, crop_w = self.spec.crop
        geometry = packed.geometry
        rows = torch.tensor([[g.size[0], g.resized[0], g.first[0], g.low[0]] for g in geometry])
        cols = torch.tensor([[g.size[1], g.resized[1], g.first[1], g.low[1]] for g in geometry])
        tables = torch.stack([rows, cols])
        if device.type == "cuda":
            tables = tables.pin_memory()
        tables = tables.to(device, non_blocking=True)
        th = taps([(g.size[0], g.resized[0]) for g in geometry], crop_h)
        tw = taps([(g.size[1], g.resized[1]) for g in geometry], crop_w)
        ih, wh = band_weights(tables[0], crop_h, th)
        iw, ww = band_weights(tables[1], crop_w, tw)
        out = torch.empty(len(geometry), 3, crop_h, crop_w, dtype=torch.float32, device=device)
        for members, block in zip(packed.groups, packed.padded, strict=True):
            on = torch.tensor(members, dtype=torch.int64).to(device, non_blocking=True)
            dense_h = _dense(ih[on], wh[on], block.shape[2])  # (g, crop_h, h)
            dense_w = _dense(iw[on], ww[on], block.shape[3])  # (g, crop_w, w)
            x = torch.matmul(dense_h[:, None], block)  # (g, 3, crop_h, w)
            x = torch.matmul(x, dense_w.transpose(1, 2)[:, None])  # (g, 3, crop_h, crop_w)
            out.index_copy_(0, on, x.clamp_(0, 255).round_())
        return out


def _dense(index: Tensor, weight: Tensor, length: int) -> Tensor:
    """Band coefficients ``(g, count, taps)`` as dense ``(g, count, length)`` matrices."""
    dense = torch.zeros(*index.shape[:2], length, dtype=weight.dtype, device=index.device)
    return dense.scatter_add_(2, index.clamp_(max=length - 1), weight)
