"""Model-only A/B on one GPU, in one process: open_clip's patch-embedding convolution (cuDNN) against
clip_fabric's ``MatmulPatchEmbedding``, for ViT-B-32 and ViT-L-14 in pure bf16 at batch 1024; for
ViT-L-14 also the MLP's GELU fused into its first matmul (cuBLASLt epilogue, tanh approximation) as a
probe; embedding cosines between the variants and against a float32 reference; a torch.profiler table
of each model as clip_fabric runs it.

    HF_HUB_OFFLINE=1 python docs/measurements/2026-11-25-h100-matmul/probe.py
"""

from __future__ import annotations

import copy
import time

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clip_fabric.model import MatmulPatchEmbedding

BATCH = 1024


class FusedGeluMlp(nn.Module):
    """c_fc + GELU (tanh approximation, in cuBLASLt's epilogue) + c_proj: a probe, not used by clip_fabric."""

    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.c_fc, self.c_proj = mlp.c_fc, mlp.c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = torch._addmm_activation(
            self.c_fc.bias, x.reshape(-1, shape[-1]), self.c_fc.weight.t(), use_gelu=True
        )
        return self.c_proj(h).reshape(*shape[:-1], -1)


def rate(model: nn.Module, x: torch.Tensor, seconds: float = 2.0) -> float:
    """Images/s: warm-up, then the faster of two passes of about ``seconds``."""
    for _ in range(3):
        model.encode_image(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.encode_image(x)
    torch.cuda.synchronize()
    reps = max(2, int(seconds / (time.perf_counter() - start)))
    best = 0.0
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            model.encode_image(x)
        torch.cuda.synchronize()
        best = max(best, BATCH * reps / (time.perf_counter() - start))
    return best


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float()).min().item()


def show_profile(model: nn.Module, x: torch.Tensor, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    model.encode_image(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            model.encode_image(x)
        torch.cuda.synchronize()
    print(f"--- profile, {title}: 3 batches of {BATCH}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


def main() -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    torch.manual_seed(0)
    for name in ("ViT-B-32", "ViT-L-14"):
        torch.manual_seed(0)
        conv_model = open_clip.create_model(name).eval().requires_grad_(False)
        x32 = torch.randn(BATCH, 3, 224, 224, device=device)
        with torch.inference_mode():
            reference = conv_model.to(device).encode_image(x32[:64])  # float32, cuDNN convolution
        conv_model = conv_model.to(torch.bfloat16)
        matmul_model = copy.deepcopy(conv_model)
        matmul_model.visual.conv1 = MatmulPatchEmbedding(matmul_model.visual.conv1)
        variants = {"conv (open_clip)": conv_model, "matmul patch embedding": matmul_model}
        if name == "ViT-L-14":
            fused = copy.deepcopy(matmul_model)
            for block in fused.visual.transformer.resblocks:
                assert type(block.mlp.gelu) is nn.GELU
                block.mlp = FusedGeluMlp(block.mlp)
            variants["matmul + fused tanh GELU (probe)"] = fused
        x = x32.to(torch.bfloat16)
        with torch.inference_mode():
            outputs = {label: m.encode_image(x[:64]) for label, m in variants.items()}
            rates = {label: [] for label in variants}
            for _ in range(2):  # alternate, so drift in clocks or neighbours touches all variants alike
                for label, m in variants.items():
                    rates[label].append(rate(m, x))
            print(f"=== {name}, pure bf16, batch {BATCH}")
            base = max(rates["conv (open_clip)"])
            for label in variants:
                best = max(rates[label])
                print(
                    f"{label:34s} {best:9,.0f} img/s ({'/'.join(f'{r:,.0f}' for r in rates[label])})"
                    f"  x{best / base:.3f}"
                    f"  cos vs conv bf16 {cosine(outputs[label], outputs['conv (open_clip)']):.7f}"
                    f"  cos vs fp32 {cosine(outputs[label], reference):.7f}"
                )
            print(f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
            show_profile(conv_model, x, f"{name} conv")
            show_profile(matmul_model, x, f"{name} matmul patch embedding")
        del variants, conv_model, matmul_model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
