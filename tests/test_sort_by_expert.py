"""pallas_kernels/sort_by_expert.py, the one expert-sorted layout every MoE path shares,
against a plain numpy construction of the same layout."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.sort_by_expert import sort_by_expert, tile_sorted_rows

_sort = jax.jit(sort_by_expert, static_argnums=1)
_tiles = jax.jit(tile_sorted_rows, static_argnums=(1, 2))


def _numpy_sort(group, num_groups):
    order = np.argsort(group, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(group.size)
    sizes = np.bincount(group, minlength=num_groups)
    starts = np.cumsum(sizes) - sizes
    return order, position, position - starts[group], sizes, starts


def _numpy_tiles(sizes, num_rows, tile):
    """Row by row: each group's rows, then padding to a whole tile, group after group."""
    dest, tile_expert, row = [], [], 0
    for g, size in enumerate(sizes):
        dest += list(range(row, row + size))
        tiles = -(-size // tile)
        tile_expert += [g] * tiles
        row += tiles * tile
    return np.array(dest + [-1] * (num_rows - len(dest))), np.array(tile_expert, dtype=int)


# Fixed shapes (24 copies, 9 groups, ids < 7 so the last groups are empty): hypothesis varies
# the values, and each shape compiles once.
@settings(deadline=None, max_examples=30)
@given(
    groups=st.lists(st.integers(0, 6), min_size=24, max_size=24),
    extra=st.sampled_from([0, 3]),
    tile=st.sampled_from([1, 2, 4, 8]),
)
def test_sort_and_tiles_match_numpy(groups, extra, tile):
    num_groups = 9
    group = np.array(groups, np.int32)
    rows = _sort(group, num_groups)
    for got, want in zip(
        (rows.order_M, rows.position_M, rows.rank_M, rows.sizes_G, rows.starts_G),
        _numpy_sort(group, num_groups),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    # Rows past sum(sizes) are dropped (dest = the buffer size).
    num_rows = group.size + extra
    tiled = _tiles(rows.sizes_G, num_rows, tile)
    dest, tile_expert = _numpy_tiles(np.asarray(rows.sizes_G), num_rows, tile)
    np.testing.assert_array_equal(
        np.asarray(tiled.dest_M), np.where(dest < 0, tiled.num_rows, dest)
    )
    used = int(tiled.used_tiles[0])
    assert used == tile_expert.size
    np.testing.assert_array_equal(np.asarray(tiled.tile_expert)[:used], tile_expert)
    assert tiled.num_rows >= used * tile and tiled.num_rows % tile == 0
    np.testing.assert_array_equal(
        np.asarray(tiled.tile_count_E), -(-np.asarray(rows.sizes_G) // tile)
    )


@pytest.mark.parametrize("tile", [1, 4])
def test_every_row_lands_in_a_tile_of_its_group(tile):
    group = np.array([3, 0, 3, 3, 1, 0, 3, 2, 2, 3], np.int32)
    rows = sort_by_expert(group, 5)
    tiled = tile_sorted_rows(rows.sizes_G, group.size, tile)
    dest = np.asarray(tiled.dest_M)[np.asarray(rows.position_M)]  # copy -> buffer row
    assert len(set(dest.tolist())) == group.size  # no two copies share a row
    np.testing.assert_array_equal(np.asarray(tiled.tile_expert)[dest // tile], group)
