"""Tensor parallelism for vision towers too large for one device (``--strategy tensor_parallel``):
attention heads and MLP columns of every vision block are sharded with DTensor over the
``tensor_parallel`` mesh dimension, and the ``data_parallel`` dimension splits the shards.

It runs through Fabric's ``ModelParallelStrategy`` with ``parallelize_vision`` as its parallelize
function, torchtitan-style: one function applies the plan, the model code is not touched.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from clip_fabric.strategies.base import InferenceStrategy
from clip_fabric.topology import ParallelDims

BLOCK_PLAN = {
    "attn.q": ColwiseParallel(),
    "attn.k": ColwiseParallel(),
    "attn.v": ColwiseParallel(),
    "attn.out": RowwiseParallel(),
    "mlp.c_fc": ColwiseParallel(),
    "mlp.c_proj": RowwiseParallel(),
}


class HeadShardableAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first) with separate q/k/v projections, so that sharding their
    output columns shards whole heads; same call signature and result as the module it replaces."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim:
            raise ValueError("tensor_parallel supports batch-first self-attention blocks only")
        dim = mha.embed_dim
        self.head_dim = dim // mha.num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, device=mha.in_proj_weight.device) for _ in range(3))
        for i, proj in enumerate((self.q, self.k, self.v)):
            proj.weight.data.copy_(mha.in_proj_weight.data[i * dim : (i + 1) * dim])
            proj.bias.data.copy_(mha.in_proj_bias.data[i * dim : (i + 1) * dim])
        self.out = mha.out_proj

    def forward(self, q_x: Tensor, k_x: Tensor, v_x: Tensor, need_weights: bool = False, attn_mask=None):
        batch, length, _ = q_x.shape

        def heads(x: Tensor) -> Tensor:  # local heads only: the projection's columns may be sharded
            return x.view(batch, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(q_x)), heads(self.k(k_x)), heads(self.v(v_x))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(x.transpose(1, 2).reshape(batch, length, -1)), None


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.visual.transformer.resblocks)


def check_shardable(model: nn.Module, tensor_parallel_size: int) -> None:
    """Heads and MLP width must split evenly, or the plan would cut a head in two."""
    for block in vision_blocks(model)[:1]:
        heads, width = block.attn.num_heads, block.mlp.c_fc.out_features
        if heads % tensor_parallel_size or width % tensor_parallel_size:
            raise ValueError(
                f"the vision tower has {heads} attention heads and MLP width {width}: the tensor-parallel "
                f"size {tensor_parallel_size} must divide both"
            )


def parallelize_vision(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard every vision block of ``module.model`` over ``mesh["tensor_parallel"]``; the rest of the
    model (text tower, embeddings, norms) is replicated."""
    tp_mesh = mesh["tensor_parallel"]
    model = module.model
    if not hasattr(model.visual, "transformer"):
        raise ValueError("--strategy tensor_parallel supports open_clip ViT vision towers only")
    check_shardable(model, tp_mesh.size())
    for block in vision_blocks(model):
        block.attn = HeadShardableAttention(block.attn)
        parallelize_module(block, tp_mesh, BLOCK_PLAN)
    return module


class VisionTensorParallelStrategy(InferenceStrategy, ModelParallelStrategy):
    """Fabric's ``ModelParallelStrategy`` with the vision plan; ranks of one tensor-parallel group read
    the same shards (they compute one batch together) and only the first of them writes."""

    retries_oom = False

    def __init__(self, tensor_parallel_size: int | str = "auto", **kwargs) -> None:
        super().__init__(parallelize_vision, tensor_parallel_size=tensor_parallel_size, **kwargs)

    @classmethod
    def dims(cls, world_size: int | None, tensor_parallel_size: int | None) -> ParallelDims:
        """Tensor parallel within a node by default (Fabric's ``auto``: the devices of a node), data
        parallel across; an explicit size must divide the world."""
        if tensor_parallel_size is not None and world_size is None:
            raise ValueError("--tensor_parallel_size needs a number of --devices, not 'auto'")
        return ParallelDims(world_size, tensor_parallel=tensor_parallel_size)

    @classmethod
    def build(
        cls, dims: ParallelDims, timeout: timedelta, tower_layout: str = "adjacent"
    ) -> VisionTensorParallelStrategy:
        if dims.tensor_parallel is None:
            return cls(timeout=timeout)  # the size Fabric picks: the devices of a node
        return cls(dims.tensor_parallel, data_parallel_size=dims.data_parallel, timeout=timeout)

    def module_to_device(self, module: nn.Module) -> None:
        module.to(self.root_device)  # the replicated parts; the plan moves the sharded ones

    def shard_split(self, rank: int, world_size: int) -> tuple[int, int]:
        mesh = self.device_mesh["data_parallel"]
        return mesh.get_local_rank(), mesh.size()

    @property
    def writes(self) -> bool:
        return self.device_mesh["tensor_parallel"].get_local_rank() == 0

    def agree_to_stop(self, stop: bool) -> bool:
        """Whether any rank of this tensor-parallel group was signalled. The group computes each batch
        together, so its ranks must stop before the same batch: a signal that reaches them a batch apart
        would otherwise leave one rank in a collective the others never enter."""
        flag = torch.tensor([float(stop)], device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.device_mesh["tensor_parallel"].get_group())
        return bool(flag.item())
