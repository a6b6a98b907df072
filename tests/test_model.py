"""The patch embedding as a matrix product: the convolution's numbers, the same weights, applied only
where it is the same operation."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch import nn

from clip_fabric.config import ModelArgs
from clip_fabric.model import MatmulPatchEmbedding, load_model, patch_embedding_as_matmul


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (35, 41), (8, 64)])
def test_matmul_patch_embedding_equals_the_convolution(bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, kernel_size=(8, 4), stride=(8, 4), bias=bias)
    x = torch.randn(3, 3, *size)
    expected = conv(x)
    got = MatmulPatchEmbedding(conv)(x)
    assert got.shape == expected.shape  # pixels past the last whole patch dropped, as the convolution does
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # open_clip flattens the output with reshape + permute: the same tokens in the same order.
    torch.testing.assert_close(got.reshape(3, 16, -1).permute(0, 2, 1), expected.flatten(2).transpose(1, 2))


def test_matmul_patch_embedding_in_bfloat16():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, kernel_size=16, stride=16, bias=False).bfloat16()
    x = torch.randn(4, 3, 64, 64, dtype=torch.bfloat16)
    got, expected = MatmulPatchEmbedding(conv)(x).float(), conv(x).float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1))
    assert cosine.min() > 0.9999


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, kernel_size=4, stride=2),  # overlapping patches
        nn.Conv2d(3, 8, kernel_size=4, stride=4, padding=1),
        nn.Conv2d(3, 8, kernel_size=4, stride=4, dilation=2),
        nn.Conv2d(4, 8, kernel_size=4, stride=4, groups=2),
    ],
)
def test_other_convolutions_are_left_alone(conv):
    assert not MatmulPatchEmbedding.applies_to(conv)
    model = nn.Module()
    model.visual = nn.Module()
    model.visual.conv1 = conv
    assert not patch_embedding_as_matmul(model)
    assert model.visual.conv1 is conv


def test_load_model_embeds_patches_by_matmul_with_the_checkpoint_weights(tiny_config, tiny_checkpoint):
    model, preprocess, _ = load_model(ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)))
    assert isinstance(model.visual.conv1, MatmulPatchEmbedding)

    open_clip.add_model_config(tiny_config)
    plain = open_clip.create_model("tiny-clip", pretrained=str(tiny_checkpoint)).eval()
    assert isinstance(plain.visual.conv1, nn.Conv2d)
    assert model.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(model.visual.conv1.weight, plain.visual.conv1.weight)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), plain.encode_image(images), rtol=1e-5, atol=1e-5
        )


def test_towers_without_a_patch_convolution_load_unchanged():
    model = nn.Module()
    model.visual = nn.Linear(2, 2)  # e.g. a timm or ModifiedResNet tower: no ``conv1`` of that kind
    assert not patch_embedding_as_matmul(model)
    assert not patch_embedding_as_matmul(nn.Linear(2, 2))
