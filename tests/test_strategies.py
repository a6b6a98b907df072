"""Strategies: where each tower goes (checked on the meta device) and that every strategy writes the
same rows as one device."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from conftest import read_output
from lightning.fabric import Fabric
from torch import nn

from clip_fabric.config import DataArgs, ModelArgs, OutputArgs
from clip_fabric.model import Embedder
from clip_fabric.predict import setup
from clip_fabric.strategies import build_strategy
from clip_fabric.strategies.ddp import InferenceDDPStrategy
from clip_fabric.strategies.tensor_parallel import HeadShardableAttention, check_shardable
from clip_fabric.strategies.towers import TowerParallelStrategy, place_towers


@pytest.mark.parametrize("custom_text", [False, True], ids=["CLIP", "CustomTextCLIP"])
def test_place_towers_splits_vision_from_everything_else(tiny_config, custom_text):
    open_clip.add_model_config(tiny_config)
    model = open_clip.create_model("tiny-clip", force_custom_text=custom_text)
    assert hasattr(model, "text") == custom_text  # both layouts of open_clip are covered
    place_towers(model, vision_device=torch.device("meta"), text_device=torch.device("cpu"))

    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    vision = {n for n, t in tensors.items() if t.device.type == "meta"}
    assert vision == {n for n in tensors if n.startswith("visual.")} and vision
    assert "logit_scale" in tensors and tensors["logit_scale"].device.type == "cpu"


def test_fabric_gives_the_strategy_its_devices():
    strategy = TowerParallelStrategy()
    Fabric(accelerator="cpu", devices=2, strategy=strategy)
    assert strategy.parallel_devices == [torch.device("cpu")] * 2
    assert strategy.vision_device == strategy.root_device == torch.device("cpu")


def test_registry():
    assert isinstance(build_strategy("ddp", 2, 1), InferenceDDPStrategy)
    assert isinstance(build_strategy("model_parallel", 2, 1), TowerParallelStrategy)
    assert build_strategy("auto", 1, 1) == "auto"
    with pytest.raises(ValueError, match="unknown --strategy 'pipeline'"):
        build_strategy("pipeline", 1, 1)


@pytest.mark.parametrize("mode", ["both", "pair"])
def test_model_parallel_writes_the_same_rows(tmp_path, tiny_config, tiny_checkpoint, image_folder, mode):
    results = {}
    for strategy, devices in (("auto", 1), ("model_parallel", 2)):
        out = tmp_path / strategy
        setup(
            model=ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)),
            data=DataArgs(format="folder", source=str(image_folder), shard_size=4, num_workers=0),
            output=OutputArgs(dir=str(out), dtype="float32"),
            mode=mode,
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
        )
        results[strategy] = [pq_rows(out)] + (
            [read_output(out, t) for t in ("img_emb", "text_emb")] if mode == "both" else []
        )
    single, towers = results["auto"], results["model_parallel"]
    assert single[0]["key"] == towers[0]["key"] and len(single[0]["key"]) == 11
    np.testing.assert_allclose(single[0]["similarity"], towers[0]["similarity"], atol=1e-6)
    for (a, _), (b, _) in zip(single[1:], towers[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def pq_rows(out) -> dict:
    import pandas as pd

    meta = pd.concat(pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet")))
    return {"key": list(meta["key"]), "similarity": meta["similarity"].to_numpy()}


@pytest.mark.gpu
def test_towers_on_gpu_and_cpu_match_one_device(tiny_config, tiny_checkpoint):
    """Two real devices in one process: vision on the GPU, text on the CPU, features meeting on the CPU."""
    open_clip.add_model_config(tiny_config)
    model, _, _ = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(tiny_checkpoint))
    images, texts = (
        torch.randn(6, 3, 32, 32),
        open_clip.get_tokenizer("tiny-clip")([f"t {i}" for i in range(6)]),
    )
    reference = Embedder(model.eval(), frozenset({"image", "text", "similarity"}))(images, texts)

    strategy = TowerParallelStrategy()
    strategy.parallel_devices = [torch.device("cuda:0"), torch.device("cpu")]
    encoder = Embedder(model, frozenset({"image", "text", "similarity"}))
    strategy.module_to_device(encoder)
    strategy.setup_module(encoder)
    with torch.inference_mode():
        out = encoder(images, texts)
    assert out["image"].device.type == "cuda" and out["similarity"].device.type == "cpu"
    for name, value in reference.items():
        torch.testing.assert_close(out[name].cpu(), value.detach(), atol=1e-4, rtol=1e-4)


def test_head_shardable_attention_equals_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
        got, _ = HeadShardableAttention(mha)(x, x, x, need_weights=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tensor_parallel_size_must_split_heads(tiny_config):
    open_clip.add_model_config(tiny_config)
    model = open_clip.create_model("tiny-clip")  # 2 heads, MLP width 256
    check_shardable(model, 2)
    with pytest.raises(ValueError, match="2 attention heads and MLP width 256: the tensor-parallel size 4"):
        check_shardable(model, 4)
    with pytest.raises(ValueError, match="--tensor_parallel_size 2 must divide the world size 3"):
        build_strategy("tensor_parallel", 3, 1, tensor_parallel_size=2)


def _hybrid_pair_with_one_oom(rank: int, port: int, results) -> None:
    """Ranks 0 (vision) and 1 (text) of a hybrid pair, through the strategy's own ``setup_module`` and
    ``partner_session`` (the text rank's ``_serve``); the vision tower runs out of memory once."""
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.fabric.plugins.precision import Precision

    from clip_fabric.encode import ChunkedEmbedder
    from clip_fabric.strategies.hybrid import HybridTowerStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    environment = LightningEnvironment()
    environment.set_world_size(2)
    environment.set_global_rank(rank)
    strategy = HybridTowerStrategy(
        parallel_devices=[torch.device("cpu")] * 2, cluster_environment=environment, precision=Precision()
    )
    assert strategy.role == ("vision" if rank == 0 else "text")

    class Towers(torch.nn.Module):
        calls = 0

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.text_projection = torch.nn.Parameter(torch.zeros(3, 4))

        def image_features(self, images):
            Towers.calls += 1
            if Towers.calls == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return images.float().repeat(1, 4)

        def text_features(self, tokens):
            return tokens[:, :1].float().repeat(1, 4)

        def combine(self, image, text):
            return {"image": image, "text": text}

    module = strategy.setup_module(Towers())
    with strategy.partner_session(module):  # the text rank serves its partner until it is done
        if rank == 0:
            embedder = ChunkedEmbedder(module, 4)
            ids = torch.arange(4).view(4, 1)
            out = embedder(ids, ids.repeat(1, 3))
            results.put((out["image"][:, 0].tolist(), out["text"][:, 0].tolist(), embedder.max_batch))
    dist.destroy_process_group()


@pytest.mark.slow
def test_hybrid_out_of_memory_retry_keeps_the_pair_in_step():
    """The partner had encoded the failed chunk's texts: the vision rank takes that reply before retrying
    in halves, so each retried chunk gets its own texts' features (it deadlocked before)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_hybrid_pair_with_one_oom, args=(r, port, results)) for r in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    image, text, max_batch = results.get(timeout=5)
    assert image == text == [0.0, 1.0, 2.0, 3.0] and max_batch == 2


def test_only_vision_ranks_share_the_cpus_under_hybrid():
    assert build_strategy("hybrid", 8, 1).reading_ranks(8) == 4
    assert build_strategy("ddp", 8, 1).reading_ranks(8) == 8


def test_only_hybrid_cannot_encode_texts_alone():
    """evaluate's zero-shot classifier encodes prompts without images: hybrid's text ranks cannot."""
    from clip_fabric.strategies import STRATEGIES

    assert {name for name, cls in STRATEGIES.items() if not cls.encodes_texts_alone} == {"hybrid"}
