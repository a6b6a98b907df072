"""The typed batch: pinned, moved and thinned without losing track of its rows."""

from __future__ import annotations

import torch

from clip_fabric.data.batch import Batch, PackedJpegs


def test_drop_moves_rows_to_errors_and_keeps_tensors_aligned():
    batch = Batch(3, "s3", [{"key": k} for k in "abcd"], images=torch.arange(4.0)[:, None],
                  texts=torch.arange(4)[:, None] * 10)  # fmt: skip
    out = batch.drop({1: "undecodable", 3: "too large"})
    assert [r["key"] for r in out.rows] == ["a", "c"]
    assert out.errors == [{"key": "b", "source": "s3", "reason": "undecodable"},
                          {"key": "d", "source": "s3", "reason": "too large"}]  # fmt: skip
    assert out.images[:, 0].tolist() == [0.0, 2.0] and out.texts[:, 0].tolist() == [0, 20]
    assert len(batch.rows) == 4  # the original is left as it was


def test_to_moves_model_inputs_and_keeps_the_rest():
    jpegs = PackedJpegs(torch.zeros(8, dtype=torch.uint8), torch.tensor([8]), torch.tensor([0]))
    batch = Batch(0, "s0", [{"key": "a"}], last=True, images=torch.ones(1, 2), jpegs=jpegs)
    moved = batch.to(torch.device("meta"))
    assert moved.images.device.type == "meta" and moved.texts is None
    assert moved.jpegs is jpegs and moved.last and moved.rows == batch.rows


def test_to_normalises_uint8_pixels_on_the_device():
    pixels = torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(2, 3, 1, 2).contiguous()
    batch = Batch(0, "s0", [{"key": "a"}, {"key": "b"}], images=pixels)
    moved = batch.to(torch.device("cpu"), lambda x: x.float() / 255.0 * 2 - 1)
    assert moved.images.dtype == torch.float32 and moved.images[0, 0, 0].tolist() == [-1.0, 1.0]
    floats = Batch(0, "s0", [{"key": "a"}], images=torch.ones(1, 2))
    assert floats.to(torch.device("cpu")).images is floats.images  # model input already: left alone


def test_the_dataloader_keeps_batches_whole():
    """Batches cross from worker processes as they are (pin_memory calls Batch.pin_memory on a GPU)."""
    from torch.utils.data import DataLoader, IterableDataset

    class Two(IterableDataset):
        def __iter__(self):
            yield Batch(0, "s0", [{"key": "a"}], images=torch.ones(1, 3))
            yield Batch(0, "s0", [], last=True)

    first, second = list(DataLoader(Two(), batch_size=None, num_workers=1))
    assert isinstance(first, Batch) and first.images.shape == (1, 3) and second.last and second.images is None
