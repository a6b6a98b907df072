"""Encoding in order with one batch in flight, and what a stop does to the shards begun."""

from __future__ import annotations

import torch

from clip_fabric.data.batch import Batch
from clip_fabric.encode import encode_in_order


def batches(layout: list[tuple[int, int, bool]]) -> list[Batch]:
    """Batches of ``(shard, rows, last)``, each row's image a number that says which batch it came from."""
    out = []
    for n, (shard, rows, last) in enumerate(layout):
        images = torch.full((rows, 1), float(n))
        out.append(
            Batch(shard, f"s{shard}", [{"key": f"{n}-{i}"} for i in range(rows)], last=last, images=images)
        )
    return out


def embed(images, texts):
    return {"image": images * 2}


def test_results_come_in_order_one_batch_behind():
    calls = []

    def counting(images, texts):
        calls.append(float(images[0, 0]))
        return embed(images, texts)

    out = []
    layout = [(0, 2, False), (0, 1, True), (1, 3, True)]
    for batch, outputs, latency in encode_in_order(batches(layout), counting, lambda: False, set):
        out.append((batch.shard, outputs["image"][:, 0].tolist()))
        assert latency >= 0
        # The batch after this one was already launched when this one's results were handed out.
        assert len(calls) == min(len(out) + 1, 3)
    assert out == [(0, [0.0, 0.0]), (0, [2.0]), (1, [4.0, 4.0, 4.0])]


def test_a_batch_without_rows_is_not_encoded():
    seen = []
    layout = [(0, 0, True), (1, 2, True)]
    for batch, outputs, _ in encode_in_order(batches(layout), embed, lambda: False, set):
        seen.append((batch.shard, sorted(outputs)))
    assert seen == [(0, []), (1, ["image"])]


def test_a_stop_finishes_the_shards_begun_and_begins_no_other():
    layout = [(0, 1, False), (1, 1, False), (0, 1, True), (2, 1, True), (1, 1, True), (3, 1, True)]
    open_shards: set[int] = set()
    written = []
    stop_after = 2  # the signal lands once two batches were launched: shards 0 and 1 are begun
    launched = {"n": 0}

    def stopping():
        launched["n"] += 1
        return launched["n"] > stop_after

    for batch, _, _ in encode_in_order(batches(layout), embed, stopping, lambda: open_shards):
        written.append((batch.shard, batch.last))
        (open_shards.discard if batch.last else open_shards.add)(batch.shard)
    # Shards 0 and 1 are completed; shards 2 and 3, not begun before the signal, are left for the rerun.
    assert written == [(0, False), (1, False), (0, True), (1, True)]


def test_no_retry_where_a_forward_is_collective():
    """Under tensor_parallel one rank's retry in halves would leave its group mid-collective: it raises."""
    import pytest

    from clip_fabric.encode import ChunkedEmbedder
    from clip_fabric.strategies import STRATEGIES

    def oom(images, texts):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    assert not STRATEGIES["tensor_parallel"].retries_oom and STRATEGIES["ddp"].retries_oom
    embedder = ChunkedEmbedder(oom, 8, retries_oom=False)
    with pytest.raises(torch.OutOfMemoryError):
        embedder(torch.zeros(8, 1), None)
    assert embedder.max_batch == 8
