"""The GPU path's batched resize, run here on the CPU."""

from __future__ import annotations

import random

import open_clip
import torch
import torch.nn.functional as F

from clip_fabric.data.decode import ImageSpec
from clip_fabric.data.resize import PAD_BUDGET, BatchResize, Geometry, groups_of

SPEC = ImageSpec.from_preprocess(open_clip.image_transform(224, is_train=False))


def exact(image: torch.Tensor) -> torch.Tensor:
    """open_clip's resize and crop in float64 (torch's antialiased bicubic), rounded as PIL stores it."""
    x = image.expand(3, -1, -1)[None].double()
    geometry = Geometry.of(SPEC, *image.shape[-2:])
    x = F.interpolate(x, size=geometry.resized, mode="bicubic", antialias=True, align_corners=False)[0]
    (top, left), (h, w) = geometry.first, SPEC.crop
    return x[:, top : top + h, left : left + w].clamp(0, 255).round()


def test_every_size_in_one_batch_is_within_a_rounding_step_of_the_exact_resize():
    g = torch.Generator().manual_seed(0)
    shapes = [(375, 500), (1, 1), (2, 900), (900, 2), (37, 1200), (224, 224), (225, 223), (1200, 1600)]
    rnd = random.Random(0)
    for _ in range(12):  # photo-like: shorter side 256-768, aspect 0.5-2
        short, aspect = rnd.randint(256, 768), rnd.uniform(1, 2)
        shapes.append((short, int(short * aspect)) if rnd.random() < 0.5 else (int(short * aspect), short))
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in shapes]
    images[3] = images[3][:1]  # a grey image: one channel, repeated as RGB
    out = BatchResize(SPEC)(images)
    assert out.shape == (len(images), 3, 224, 224)
    for image, mine in zip(images, out, strict=True):
        diff = (mine.double() - exact(image)).abs()
        # Noise images put values next to every rounding boundary: a float32 sum lands a step away rarely.
        assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3, (image.shape, diff.max())


def test_the_window_is_what_the_crop_reads_and_the_groups_pad_little():
    geometry = Geometry.of(SPEC, 600, 1200)  # the crop keeps the middle 224 of 448 resized columns
    assert geometry.resized == (224, 448) and geometry.first == (0, 112)
    assert geometry.low[0] == 0 and geometry.high[0] == 600
    assert 290 < geometry.low[1] < 300 and 900 < geometry.high[1] < 910  # about the middle half
    rnd = random.Random(1)
    extents = [(rnd.randint(256, 768),) * 2 for _ in range(512)]
    groups = groups_of(extents)
    assert sorted(i for group in groups for i in group) == list(range(512)) and len(groups) < 40
    for group in groups:
        padded = max(extents[i][0] for i in group) ** 2 * len(group)
        assert padded <= PAD_BUDGET * sum(extents[i][0] ** 2 for i in group) + 128 * 128 * len(group)
