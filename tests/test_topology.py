"""The hybrid layout as a value: pairs, roles and partners, checked without any process."""

from __future__ import annotations

import pytest

from clip_fabric.topology import TowerPairs


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
