"""The layouts as values, checked without any process: the hybrid pairs (roles, partners) and how a
world splits into tensor-parallel, tower and data-parallel groups (``ParallelDims``)."""

from __future__ import annotations

import pytest

from clip_fabric.topology import ParallelDims, TowerPairs


@pytest.mark.parametrize("layout", ["adjacent", "halves"])
@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_every_rank_is_in_exactly_one_pair(world, layout):
    pairs = TowerPairs(world, layout)
    members = sorted(r for p in range(pairs.num_pairs) for r in (pairs.vision_rank(p), pairs.text_rank(p)))
    assert members == list(range(world)) and pairs.num_pairs == world // 2
    for rank in range(world):
        partner = pairs.partner(rank)
        assert pairs.partner(partner) == rank and pairs.pair(partner) == pairs.pair(rank)
        assert {pairs.role(rank), pairs.role(partner)} == {"vision", "text"}


def test_layouts():
    assert [TowerPairs(8, "adjacent").role(r)[0] for r in range(8)] == list("vtvtvtvt")
    assert [TowerPairs(8, "halves").role(r)[0] for r in range(8)] == list("vvvvtttt")
    assert TowerPairs(8, "halves").partner(1) == 5


@pytest.mark.parametrize("world", [0, 1, 3, 7])
def test_world_size_that_does_not_fit(world):
    with pytest.raises(ValueError, match=f"even world size of at least 2, not {world}"):
        TowerPairs(world)


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown tower layout 'rings'"):
        TowerPairs(4, "rings")


# -- ParallelDims: how a world splits into tensor-parallel, tower and data-parallel groups -------------


@pytest.mark.parametrize(
    ("world", "tensor_parallel", "towers", "data_parallel"),
    [
        (8, 1, 1, 8),  # ddp
        (8, 4, 1, 2),  # tensor_parallel: two groups of four share a vision tower each
        (8, 8, 1, 1),
        (8, 1, 2, 4),  # hybrid: four pairs
        (12, 2, 2, 3),
        (None, 1, 1, None),  # --devices auto: known once launched
        (8, None, 1, None),  # the tensor-parallel default, the devices of a node
    ],
)
def test_parallel_dims_split_the_world(world, tensor_parallel, towers, data_parallel):
    dims = ParallelDims(world, tensor_parallel=tensor_parallel, towers=towers)
    assert dims.data_parallel == data_parallel
    if data_parallel is not None:
        assert data_parallel * tensor_parallel * towers == world


@pytest.mark.parametrize(
    ("world", "tensor_parallel", "towers", "message"),
    [
        (6, 4, 1, r"--tensor_parallel_size 4 must divide the world size 6 \(devices × nodes\)"),
        (2, 4, 1, r"--tensor_parallel_size 4 must divide the world size 2"),
        (6, 2, 2, r"a world of 6 ranks .* cannot be split into groups of 4 \(2 tensor-parallel x 2 tower"),
        (8, 0, 1, r"--tensor_parallel_size must be >= 1, got 0"),
        (None, 0, 1, r"--tensor_parallel_size must be >= 1, got 0"),  # checked before the world is known
    ],
)
def test_parallel_dims_that_do_not_fit_are_one_line_errors(world, tensor_parallel, towers, message):
    with pytest.raises(ValueError, match=message) as err:
        ParallelDims(world, tensor_parallel=tensor_parallel, towers=towers)
    assert "\n" not in str(err.value)


def test_parallel_dims_are_frozen():
    dims = ParallelDims(8, tensor_parallel=2)
    with pytest.raises(AttributeError):
        dims.world_size = 4  # type: ignore[misc]
    assert dims == ParallelDims(8, 2, 1)
