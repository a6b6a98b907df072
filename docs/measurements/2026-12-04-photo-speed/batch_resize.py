"""open_clip's resize and center crop for a batch of images of any mix of sizes, in a few kernels.

The antialiased bicubic resize (PIL's filter, which torch's ``antialias=True`` path reproduces) is
separable: an image ``X`` (H x W) becomes ``Wh @ X @ Ww.T`` with one coefficient matrix per axis, and the
center crop only keeps some rows of each. So every image is two matrix products, whatever its size.
The images of a batch are sorted by size and cut into groups whose padding to the group's largest height
and width stays small; each group is then two batched products (zero weights over the padding), and the
coefficients of the whole batch are computed together from the filter's formula. The products run in
float32 (never TF32) and the result is rounded to whole values as PIL stores them: the same pixels as
``ImageSpec.pixels`` (torch's interpolate) but for float rounding, which moves a value by one step once in
about 10^5. Measured slower than one interpolate per size on an H200 (README.md here), so not used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clip_fabric.data.decode import ImageSpec

# A group may pad its images to at most this share more values than they hold, plus a little slack for
# groups of small images, where padding costs less than another round of kernels.
PAD_BUDGET = 1.3
PAD_SLACK_VALUES = 256 * 256
# At most this many input values (x 3 channels, float32) in one group, so large photos go in chunks.
GROUP_VALUES = 48 * 1024 * 1024
BICUBIC_A = -0.5  # the antialiased filter's coefficient (PIL's and torch's; plain bicubic uses -0.75)


def _bicubic(x: Tensor) -> Tensor:
    """PIL's bicubic filter at distances ``x`` (zero beyond 2)."""
    a, x = BICUBIC_A, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def axis_weights(sizes: Tensor, outs: Tensor, first: Tensor, count: int, length: int) -> Tensor:
    """Coefficients of one axis for many images: ``(n, count, length)`` float32, where image ``i`` of
    ``sizes[i]`` input pixels is resized to ``outs[i]`` and output rows ``first[i] ..
    first[i] + count`` are kept (the crop). ``length`` >= every size; columns past an image's size are
    zero. The formula is torch's ``_compute_weights_aa`` (PIL's ``precompute_coeffs``), in float64."""
    device = sizes.device
    size, out = sizes.double()[:, None, None], outs.double()[:, None, None]
    scale = size / out
    support = torch.where(scale >= 1, 2 * scale, torch.full_like(scale, 2.0))
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    kept = torch.arange(count, device=device, dtype=torch.float64)[None, :, None]
    rows = first[:, None, None].double() + kept
    center = scale * (rows + 0.5)
    low = (center - support + 0.5).trunc().clamp(min=0)
    high = torch.minimum((center + support + 0.5).trunc(), size)
    x = torch.arange(length, device=device, dtype=torch.float64)[None, None, :]
    w = torch.where((x >= low) & (x < high), _bicubic((x - center + 0.5) * inv), 0.0)
    return (w / w.sum(-1, keepdim=True)).float()


class BatchResize:
    """``spec``'s resize and center crop on a list of uint8 images, each CHW of its own size: float32
    NCHW pixels of whole values in [0, 255] (``spec.normalise`` makes them model input)."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec

    def __call__(self, images: list[Tensor]) -> Tensor:
        device = images[0].device
        crop_h, crop_w = self.spec.crop
        out = torch.empty(len(images), 3, crop_h, crop_w, device=device)
        shapes = [tuple(image.shape[-2:]) for image in images]
        heights, widths, tops, lefts, new_h, new_w = self._geometry(shapes, device)
        wh_all = (heights, new_h, tops, crop_h)
        ww_all = (widths, new_w, lefts, crop_w)
        for members in self._groups(shapes):
            index = torch.tensor(members, dtype=torch.int64)
            h, w = max(shapes[i][0] for i in members), max(shapes[i][1] for i in members)
            padded = torch.zeros(len(members), 3, h, w, device=device)
            for k, i in enumerate(members):
                padded[k, :, : shapes[i][0], : shapes[i][1]].copy_(images[i].expand(3, -1, -1))
            on = index.to(device, non_blocking=True)
            wh = axis_weights(*(t[on] for t in wh_all[:3]), wh_all[3], h)  # (g, crop_h, h)
            ww = axis_weights(*(t[on] for t in ww_all[:3]), ww_all[3], w)  # (g, crop_w, w)
            # The cheaper order: one axis first, then the other on the already smaller result.
            if crop_w * h * (w + crop_h) <= crop_h * w * (h + crop_w):
                x = torch.matmul(padded, ww.transpose(1, 2)[:, None])  # (g, 3, h, crop_w)
                x = torch.matmul(wh[:, None], x)  # (g, 3, crop_h, crop_w)
            else:
                x = torch.matmul(wh[:, None], padded)  # (g, 3, crop_h, w)
                x = torch.matmul(x, ww.transpose(1, 2)[:, None])
            out.index_copy_(0, on, x.clamp_(0, 255).round_())
        return out

    def _geometry(self, shapes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, ...]:
        """Per image: input height and width, the crop's first row and column in the resized image, and
        the resized height and width, as device tensors (one copy for the batch)."""
        rows = []
        for height, width in shapes:
            nh, nw = self.spec.resized(height, width)
            top = int(round((nh - self.spec.crop[0]) / 2.0))
            left = int(round((nw - self.spec.crop[1]) / 2.0))
            rows.append((height, width, top, left, nh, nw))
        table = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            table = table.pin_memory()
        return tuple(table.to(device, non_blocking=True).unbind(1))

    @staticmethod
    def _groups(shapes: list[tuple[int, int]]) -> list[list[int]]:
        """Positions of the images in groups of similar size: sorted by orientation, height and width,
        each group grown while its padding stays within PAD_BUDGET and its values within GROUP_VALUES."""
        order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] > shapes[i][1], *shapes[i]))
        groups: list[list[int]] = []
        members: list[int] = []
        held = top_h = top_w = 0
        for i in order:
            h, w = shapes[i]
            grown_h, grown_w = max(top_h, h), max(top_w, w)
            padded = grown_h * grown_w * (len(members) + 1)
            fits = padded <= PAD_BUDGET * (held + h * w) + PAD_SLACK_VALUES and 3 * padded <= GROUP_VALUES
            if members and not fits:
                groups.append(members)
                members, held, grown_h, grown_w = [], 0, h, w
            members.append(i)
            held += h * w
            top_h, top_w = grown_h, grown_w
        if members:
            groups.append(members)
        return groups
