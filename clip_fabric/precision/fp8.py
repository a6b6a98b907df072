"""FP8 inference on GPUs of compute capability 8.9 or newer, through Transformer Engine's fused blocks.

open_clip's blocks run their attention through ``nn.MultiheadAttention``, whose QKV projection is a bare
Parameter and whose output projection is called through its ``.weight`` (``F.multi_head_attention_forward``),
so a plugin that swaps ``nn.Linear`` layers, Lightning's ``TransformerEnginePrecision`` included, puts only
the two MLP matmuls in FP8: a third of each block's matmul work stays bf16. ``split_attention`` rewrites that
attention as two real ``nn.Linear`` layers around ``scaled_dot_product_attention``; ``TeResidualBlock`` runs
each block as Transformer Engine's ``LayerNormLinear`` (LN_1 + QKV), ``Linear`` (out projection) and
``LayerNormMLP`` (LN_2 + fc1 + GELU + fc2).

``--precision fp8`` (``TransformerEngineFp8Precision``: fused blocks in both towers, per-tensor current
scaling) was measured faster than ``bf16-true`` on the large towers but further from float32 than the
fidelity bound; Lightning's plugin and torchao's float8 were slower, and neither is used. The figures:
docs/precision.md and docs/measurements/2026-12-01-fp8/README.md. torchao's plugin, which no command
reached, is gone (it is in 8ffec72, for experiments).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.fabric.plugins.precision import Precision
from torch import Tensor, nn
from typing_extensions import override

from clip_fabric.precision.fp8_support import MIN_FP8_CAPABILITY, transformer_engine_status
from clip_fabric.precision.fp32_parts import FP32_TYPES, keep_fp32, to_dtype_except
from clip_fabric.precision.fused_gelu import fuse_mlp_gelu
from clip_fabric.precision.plugins import Fp32NormsHalfPrecision

Recipe = Literal["current", "delayed", "block"]
Towers = Literal["image", "all"]
ROW_MULTIPLE = 16  # FP8 GEMMs take row counts that are multiples of 8 (16 for some recipes): pad to 16


def check_fp8(
    capability: tuple[int, int] | None, device_name: str, backend: str | None, why: str = ""
) -> None:
    """Raise a one-line ValueError unless this GPU and the installed packages can run FP8 (``why``: the
    reason ``transformer_engine_status`` gave, for the message)."""
    if capability is None:
        raise ValueError("--precision fp8 needs a CUDA GPU of capability 8.9+ (Ada, Hopper), none found")
    if capability < MIN_FP8_CAPABILITY:
        raise ValueError(
            f"--precision fp8 needs compute capability 8.9+ (Ada, Hopper); {device_name} is "
            f"sm_{capability[0]}{capability[1]}: use --precision bf16-mixed or auto"
        )
    if backend is None:
        raise ValueError(
            f"--precision fp8 on {device_name} needs Transformer Engine"
            f"{': ' + why if why else ''}; torchao's float8 measured slower than bf16-true "
            "(docs/precision.md): use --precision bf16-true"
        )


class LinearAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch first) as a QKV ``nn.Linear``, PyTorch's
    ``scaled_dot_product_attention`` and an output ``nn.Linear``: the same function, with both
    projections as layers that FP8 conversions see. It answers open_clip's call
    ``attn(x, x, x, need_weights=False, attn_mask=mask)`` with ``(output, None)``."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        bias = mha.in_proj_bias is not None
        device, dtype = mha.in_proj_weight.device, mha.in_proj_weight.dtype
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    @staticmethod
    def applies_to(mha: nn.Module) -> bool:
        return (
            type(mha) is nn.MultiheadAttention
            and mha.batch_first
            and mha._qkv_same_embed_dim
            and mha.bias_k is None
            and not mha.add_zero_attn
            and mha.dropout == 0.0
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("LinearAttention is self-attention: key and value must be the query")
        return attend(self.qkv(query), self.num_heads, attn_mask, self.out_proj), None


def attend(qkv: Tensor, heads: int, attn_mask: Tensor | None, out_proj: nn.Module | None = None) -> Tensor:
    """``out_proj(softmax(q k^T / sqrt(d) + mask) v)`` (no projection where None) from a
    ``[batch, tokens, 3 * dim]`` QKV product laid out as ``nn.MultiheadAttention``'s ``in_proj_weight``
    (all q, then all k, then all v; heads inside)."""
    batch, tokens, width = qkv.shape
    q, k, v = qkv.view(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    mask = attn_mask.to(q.dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, tokens, -1)
    return out if out_proj is None else out_proj(out)


def _blocks(model: nn.Module, towers: Towers) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, block) of each open_clip ``ResidualAttentionBlock`` in the towers asked for."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    roots = [m for m in model.modules() if isinstance(m, VisionTransformer)] if towers == "image" else [model]
    found = []
    for root in roots:
        if root is None:
            continue
        for parent in root.modules():
            for name, child in parent.named_children():
                if type(child) is ResidualAttentionBlock and not hasattr(child, "ln_1_kv"):
                    found.append((parent, name, child))
    return found


def split_attention(model: nn.Module, towers: Towers = "all") -> list[str]:
    """Replace the ``nn.MultiheadAttention`` of each open_clip block in ``towers`` by a
    :class:`LinearAttention`, in place; return the names of the blocks changed."""
    changed = []
    for _, _, block in _blocks(model, towers):
        if LinearAttention.applies_to(block.attn):
            block.attn = LinearAttention(block.attn)
            changed.append(block)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in changed]


RECIPES = ("current", "delayed", "block")


def te_recipe(recipe: Recipe):
    """Transformer Engine's recipe object: per-tensor current scaling (the scale of each tensor from its
    own amax, computed as it is cast), delayed scaling (from the amaxes of earlier calls: the first call
    of a module has none), or 1x128 / 128x128 block scaling (Hopper, CUDA 12.9+)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown Transformer Engine recipe {recipe!r}: current, delayed or block")
    from transformer_engine.common import recipe as te_recipes

    if recipe == "current":
        return te_recipes.Float8CurrentScaling()
    if recipe == "delayed":
        return te_recipes.DelayedScaling()
    return te_recipes.Float8BlockScaling()


def _pad_rows(x: Tensor) -> tuple[Tensor, int]:
    """``x`` as ``[rows, dim]`` with rows padded up to a multiple of ``ROW_MULTIPLE``; the real row count."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    pad = -rows % ROW_MULTIPLE
    return (F.pad(flat, (0, 0, 0, pad)) if pad else flat), rows


class TeResidualBlock(nn.Module):
    """An open_clip ``ResidualAttentionBlock`` as Transformer Engine modules: ``LayerNormLinear`` (LN_1 and
    QKV), PyTorch's flash attention, ``Linear`` (out projection) and ``LayerNormMLP`` (LN_2, fc1, GELU's
    tanh form as in ``bf16-true``, fc2). The norms are computed in float32 inside TE's kernels and write
    FP8; weights are bf16 (``fp8_weights``: stored in FP8, current scaling only). Rows are padded to a
    multiple of 16, so any batch size runs. The same call signature as the block it replaces."""

    def __init__(self, block: nn.Module, recipe: Recipe = "current", fp8_weights: bool = False) -> None:
        import transformer_engine.pytorch as te
        from open_clip.transformer import QuickGELU

        super().__init__()
        attn, mlp = block.attn, block.mlp
        if isinstance(attn, LinearAttention):
            dim, heads = attn.qkv.in_features, attn.num_heads
            in_w, in_b, out = attn.qkv.weight, attn.qkv.bias, attn.out_proj
        elif LinearAttention.applies_to(attn):
            dim, heads = attn.embed_dim, attn.num_heads
            in_w, in_b, out = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj
        else:
            raise ValueError(f"TeResidualBlock cannot take this attention: {type(attn).__name__}")
        act = mlp.gelu
        if type(act) is nn.GELU:
            activation = "gelu"
        elif isinstance(act, QuickGELU):
            activation = "qgelu"
        else:
            raise ValueError(f"TeResidualBlock has no Transformer Engine form of {type(act).__name__}")
        if fp8_weights and recipe != "current":
            raise ValueError("FP8 weights need current scaling: delayed scaling casts them with no amax yet")
        device, dtype = in_w.device, torch.bfloat16
        self.num_heads = heads
        with te.quantized_model_init(enabled=fp8_weights, recipe=te_recipe(recipe) if fp8_weights else None):
            self.ln_qkv = te.LayerNormLinear(
                dim, 3 * dim, eps=block.ln_1.eps, bias=in_b is not None, params_dtype=dtype, device=device
            )
            self.out_proj = te.Linear(dim, dim, bias=out.bias is not None, params_dtype=dtype, device=device)
            self.ln_mlp = te.LayerNormMLP(
                dim,
                mlp.c_fc.out_features,
                eps=block.ln_2.eps,
                bias=mlp.c_fc.bias is not None,
                activation=activation,
                params_dtype=dtype,
                device=device,
            )
        pairs = [
            (self.ln_qkv.layer_norm_weight, block.ln_1.weight),
            (self.ln_qkv.layer_norm_bias, block.ln_1.bias),
            (self.ln_qkv.weight, in_w),
            (getattr(self.ln_qkv, "bias", None), in_b),
            (self.out_proj.weight, out.weight),
            (getattr(self.out_proj, "bias", None), out.bias),
            (self.ln_mlp.layer_norm_weight, block.ln_2.weight),
            (self.ln_mlp.layer_norm_bias, block.ln_2.bias),
            (self.ln_mlp.fc1_weight, mlp.c_fc.weight),
            (getattr(self.ln_mlp, "fc1_bias", None), mlp.c_fc.bias),
            (self.ln_mlp.fc2_weight, mlp.c_proj.weight),
            (getattr(self.ln_mlp, "fc2_bias", None), mlp.c_proj.bias),
        ]
        with torch.no_grad():
            for dst, src in pairs:
                if src is not None:
                    dst.copy_(src.detach().to(device=device, dtype=dtype))
        self.ls_1, self.ls_2 = block.ls_1, block.ls_2

    def get_weight_dtype(self) -> torch.dtype:
        return torch.bfloat16  # open_clip's text tower casts its input to the first block's weight dtype

    def forward(
        self,
        q_x: Tensor,
        k_x: Tensor | None = None,
        v_x: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("TeResidualBlock is self-attention only")
        shape = q_x.shape
        flat, rows = _pad_rows(q_x)
        qkv = self.ln_qkv(flat)[:rows].view(*shape[:-1], 3 * shape[-1])
        out, _ = _pad_rows(attend(qkv, self.num_heads, attn_mask))
        x = q_x + self.ls_1(self.out_proj(out)[:rows].view(shape))
        flat, _ = _pad_rows(x)
        return x + self.ls_2(self.ln_mlp(flat)[:rows].view(shape))


class TransformerEngineFp8Precision(Fp32NormsHalfPrecision):
    """``bf16-true`` with float32 norms and projections, the MLP GELU in its matmul where blocks stay bf16,
    and each open_clip transformer block of ``towers`` as a :class:`TeResidualBlock` run under
    Transformer Engine's FP8 ``recipe``.

    The defaults are the measured choice (docs/measurements/2026-12-01-fp8/README.md): current scaling,
    as accurate as block scaling and faster; delayed scaling was faster still but much further from
    float32. Both towers: the text tower kept its cosine in FP8 and ran faster, while ``towers="image"``
    leaves it in bf16 with float32 norms, slower than ``bf16-true``'s text tower."""

    def __init__(
        self,
        recipe: Recipe = "current",
        towers: Towers = "all",
        fp8_weights: bool = False,
        tf32: bool = False,
    ) -> None:
        super().__init__("bf16-true", fp32_norms=True, tf32=tf32, gelu_epilogue=True)
        # One recipe object for every call: delayed scaling keeps its amax history per recipe.
        self.te_recipe = te_recipe(recipe)  # an unknown name fails here, before any work
        self.recipe, self.towers, self.fp8_weights = recipe, towers, fp8_weights

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

        for parent, name, block in _blocks(module, self.towers):
            setattr(parent, name, TeResidualBlock(block, self.recipe, self.fp8_weights))
        keep_fp32(module)
        to_dtype_except(module, torch.bfloat16, (*FP32_TYPES, TransformerEngineBaseModule))
        fuse_mlp_gelu(module)
        return module

    @override
    def forward_context(self) -> AbstractContextManager:
        import transformer_engine.pytorch as te

        stack = ExitStack()
        stack.enter_context(super().forward_context())
        stack.enter_context(te.autocast(enabled=True, recipe=self.te_recipe))
        return stack


def build_fp8(capability: tuple[int, int] | None, device_name: str, tf32: bool = False) -> Precision:
    """The FP8 plugin for this GPU and installation, or a one-line ValueError saying why there is none."""
    usable, why = transformer_engine_status() if capability is not None else (False, "")
    check_fp8(capability, device_name, "transformer_engine" if usable else None, why)
    return TransformerEngineFp8Precision(recipe="current", towers="all", tf32=tf32)
