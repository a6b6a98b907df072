"""The CUDA path (pinned memory, device moves, NCCL): run on the device machine, skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_output, run_cli

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_cuda_rows_equal_cpu_rows(tmp_path, tiny_config, tiny_checkpoint, image_folder, strategy):
    common = [
        "--model.config",
        str(tiny_config),
        "--model.pretrained",
        str(tiny_checkpoint),
        "--data.format",
        "folder",
        "--data.source",
        str(image_folder),
        "--data.shard_size",
        "4",
        "--mode",
        "both",
        "--output.dtype",
        "float32",
        "--data.num_workers",
        "2",
        "--data.decode",
        "pil",  # the same preprocess on both sides: this compares the model's arithmetic
        "--precision",
        "32-true",  # in float32 on both sides (the default, auto, is bf16-true on the GPU)
    ]
    cpu = run_cli("predict", "--accelerator", "cpu", "--output.dir", str(tmp_path / "cpu"), *common)
    gpu = run_cli(
        "predict",
        "--accelerator",
        "cuda",
        "--strategy",
        strategy,
        "--output.dir",
        str(tmp_path / "gpu"),
        *common,
    )
    assert cpu.returncode == 0 and gpu.returncode == 0, gpu.stderr[-3000:]
    for tower in ("img_emb", "text_emb"):
        a, a_keys = read_output(tmp_path / "cpu", tower)
        b, b_keys = read_output(tmp_path / "gpu", tower)
        assert a_keys == b_keys and len(a_keys) == 11
        # fp32 on the GPU may use other kernels; TF32 is off by default for matmuls in PyTorch.
        assert np.all(1 - (a.astype(np.float64) * b).sum(-1) < 1e-5)


def test_gpu_jpeg_decode_matches_pil_preprocess():
    """nvJPEG + batched resize on the GPU against open_clip's PIL preprocess, image by image."""
    import open_clip

    from clip_fabric.data import RawSample
    from clip_fabric.data.decode import CpuDecoder
    from clip_fabric.data.device_decode import DeviceImageDecoder, gpu_decode_available
    from tests.test_throughput import PREPROCESS, batches, encoded

    device = torch.device("cuda")
    assert gpu_decode_available(device)
    images = [
        encoded((500, 375)),
        encoded((1024, 768)),
        encoded((300, 400)),
        encoded((500, 375), mode="L"),
        encoded((500, 375), progressive=True),
        encoded((320, 240), fmt="PNG"),
        encoded((500, 375)),
    ]
    good = encoded((64, 48))
    broken = good[:200] + b"\x00" * (len(good) - 200)
    samples = [RawSample(f"k{i}", d, f"c{i}") for i, d in enumerate([*images, broken])]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"), mode="pil")
    [reference] = batches(samples[:-1], cpu, gpu_jpeg=False)
    [packed] = batches(samples, cpu, gpu_jpeg=True)
    out = DeviceImageDecoder(cpu.spec, cpu, device)(packed)
    keys = [r["key"] for r in out.rows]
    assert keys[: len(images)] == [f"k{i}" for i in range(len(images))]
    assert out.images.device.type == "cuda"
    diff = (out.images[: len(images)].cpu() - reference.images).abs()
    print(f"GPU vs PIL preprocess: mean |diff| {diff.mean():.5f}, max {diff.max():.4f} (normalised units)")
    assert diff.mean() < 0.01 and diff.max() < 0.2


@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_decode_paths_embed_like_pil(tmp_path, decode):
    """Embeddings of ViT-B-32 (random init) through each fast path against the PIL path, over enough
    batches that the GPU is still encoding one while the next is decoded (where a stream race showed)."""
    from tests.conftest import write_tar
    from tests.test_throughput import encoded

    count = 48 if decode == "cpu" else 640
    sizes = [(900 + 7 * i, 675 + 5 * i) for i in range(48)]  # the first 48 differ: also scaled on the CPU
    pictures = [encoded(size) for size in sizes]
    samples = [{"__key__": f"{i:04d}", "jpg": pictures[i % 48], "txt": b"x"} for i in range(count)]
    source = str(write_tar(tmp_path / "s-0.tar", samples))
    common = [
        "--precision",
        "32-true",  # the decode paths are compared, not precisions
        "--data.format",
        "webdataset",
        "--data.source",
        source,
        "--output.dtype",
        "float32",
        "--accelerator",
        "cuda",
        "--data.num_workers",
        "2",
        "--data.batch_size",
        "16" if decode == "cpu" else "64",
    ]
    runs = {}
    for path in ("pil", decode):
        result = run_cli("predict", *common, "--data.decode", path, "--output.dir", str(tmp_path / path))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[path] = read_output(tmp_path / path)
    (a, keys_a), (b, keys_b) = runs["pil"], runs[decode]
    assert keys_a == keys_b and len(keys_a) == count
    cos = (a.astype(np.float64) * b).sum(-1)
    print(f"{decode} vs pil embeddings (ViT-B-32, random): min cosine {cos.min():.6f}, mean {cos.mean():.6f}")
    # nvJPEG + torch's resize stay within the 1e-5 contract; the CPU path's DCT scaling does not.
    assert cos.min() > (1 - 1e-5 if decode == "gpu" else 0.999)


def test_auto_batch_size_and_decode_on_the_gpu(tmp_path, tiny_config):
    """``auto`` batch size fills the GPU; ``auto`` decode is ``gpu`` on Hopper with nvImageCodec, where
    it was measured within 1e-5 of open_clip."""
    from clip_fabric.data.device_decode import jpeg_library

    hopper = torch.cuda.get_device_capability()[0] == 9
    expected = "gpu" if hopper and jpeg_library(torch.device("cuda")) == "nvimgcodec" else "cpu"
    result = run_cli(
        "predict",
        "--model.config",
        str(tiny_config),
        "--accelerator",
        "cuda",
        "--data.num_samples",
        "64",
        "--data.num_workers",
        "1",
        "--output.dir",
        str(tmp_path / "o"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    run = json.loads((tmp_path / "o" / "summary.json").read_text())["this_run"]
    assert run["batch_size"] == 1024 and run["decode"] == expected and run["peak_memory_gb"] > 0


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14"])
def test_matmul_patch_embedding_matches_cudnn_in_bf16(name):
    """The patch embedding clip_fabric runs (a matmul) against open_clip's cuDNN convolution, whole towers
    in bf16 on the GPU: equal up to bf16 rounding."""
    import copy

    import open_clip

    from clip_fabric.model import MatmulPatchEmbedding

    torch.manual_seed(0)
    conv = open_clip.create_model(name).visual.eval().to("cuda", torch.bfloat16)
    matmul = copy.deepcopy(conv)
    matmul.conv1 = MatmulPatchEmbedding(matmul.conv1)
    images = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(conv(images).float(), matmul(images).float())
    assert cos.min() > 0.999


def test_linear_gelu_epilogue_is_the_tanh_gelu_on_cuda():
    """bf16-true's MLP layer: cuBLASLt's GELU epilogue computes what the CPU path computes, to bf16
    rounding."""
    from torch import nn

    from clip_fabric.precision.fused_gelu import LinearGelu

    torch.manual_seed(0)
    linear = nn.Linear(1024, 4096).to("cuda", torch.bfloat16)
    x = torch.randn(8, 257, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        got = LinearGelu(linear)(x).float()
        tanh = torch.nn.functional.gelu(linear(x).float(), approximate="tanh")
    assert got.shape == tanh.shape
    # bf16 rounding of values up to ~|4| is 2^-7; the exact GELU differs from tanh by up to 4.7e-4.
    torch.testing.assert_close(got, tanh, rtol=1e-2, atol=1e-2)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), tanh.flatten(1))
    assert cos.min() > 0.9999
