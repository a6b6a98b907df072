"""The CUDA path (pinned memory, device moves, NCCL): run on the device machine, skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_output, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


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
