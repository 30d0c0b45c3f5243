"""Token copies sorted by expert: the one row layout every MoE path shares.

`sort_by_expert` groups M token copies by a group id (an expert, or for expert parallelism
the device that owns the expert) with a stable sort, so copies keep token order within a
group. `tile_sorted_rows` pads each group of rows already in that order to a multiple of
`tile` rows, so that every tile belongs to one group (the tiled scan, the grouped GEMM
kernels). Both are jnp, computed outside the kernels.

Users: model/grouped_matmul.py (sort + tiles), pallas_kernels/grouped_gemm.py (tiles of
rows that arrive sorted), moe_permute.py (sort), ep_dispatch.py (send buffers by
destination device) and model/expert_parallel.py (the ragged exchange).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels._blocks import cdiv


@struct.dataclass
class ExpertSortedRows:
    """Where each of M token copies sits once sorted by group (expert or device)."""

    order_M: jax.Array  # int32: the copy at each sorted position (the stable argsort)
    position_M: jax.Array  # int32: the sorted position of each copy (the inverse of order_M)
    rank_M: jax.Array  # int32: each copy's position within its group
    sizes_G: jax.Array  # int32: copies per group
    starts_G: jax.Array  # int32: sorted position of each group's first copy


def sort_by_expert(group_M: jax.Array, num_groups: int) -> ExpertSortedRows:
    """Stable sort of copies by group id in [0, num_groups): order, inverse, ranks, sizes."""
    m = group_M.shape[0]
    group_M = group_M.astype(jnp.int32)
    order_M = jnp.argsort(group_M, stable=True).astype(jnp.int32)
    position_M = jnp.zeros((m,), jnp.int32).at[order_M].set(jnp.arange(m, dtype=jnp.int32))
    sizes_G = jnp.bincount(group_M, length=num_groups).astype(jnp.int32)
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    return ExpertSortedRows(
        order_M=order_M,
        position_M=position_M,
        rank_M=position_M - starts_G[group_M],
        sizes_G=sizes_G,
        starts_G=starts_G,
    )


@struct.dataclass
class TiledRows:
    """Where sorted rows go in a buffer whose groups are padded to whole tiles, and which
    group owns each tile."""

    dest_M: jax.Array  # buffer row of each sorted row; num_rows (dropped) past sum(sizes)
    tile_expert: jax.Array  # [T] group of each tile (clamped to G - 1 for unused tiles)
    used_tiles: jax.Array  # [1] tiles holding rows
    tile_start_E: jax.Array  # [G] first tile of each group
    tile_count_E: jax.Array  # [G] tiles of each group (0 for an empty group)
    num_rows: int = struct.field(pytree_node=False)  # buffer rows, T * tile
    tile: int = struct.field(pytree_node=False)


def tile_sorted_rows(group_sizes_E: jax.Array, num_rows: int, tile: int) -> TiledRows:
    """Pad each group of `num_rows` sorted rows (group_sizes_E of them used) to a multiple of
    `tile`; the buffer has a static bound of cdiv(num_rows, tile) + min(G, num_rows) tiles
    (each non-empty group wastes under one tile), or num_rows rows when tile is 1."""
    e = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    tiles_E = (sizes + tile - 1) // tile
    tile_end_E = jnp.cumsum(tiles_E)
    tile_start_E = tile_end_E - tiles_E
    end_E = jnp.cumsum(sizes)
    m = jnp.arange(num_rows, dtype=jnp.int32)
    expert_M = jnp.minimum(jnp.searchsorted(end_E, m, side="right"), e - 1)
    rank_M = m - (end_E - sizes)[expert_M]
    num_tiles = num_rows if tile == 1 else cdiv(num_rows, tile) + min(e, num_rows)
    buffer_rows = num_tiles * tile
    dest_M = jnp.where(m < end_E[-1], tile_start_E[expert_M] * tile + rank_M, buffer_rows)
    tile_expert = jnp.searchsorted(tile_end_E, jnp.arange(num_tiles), side="right")
    return TiledRows(
        dest_M=dest_M.astype(jnp.int32),
        tile_expert=jnp.minimum(tile_expert, e - 1).astype(jnp.int32),
        used_tiles=tile_end_E[-1:].astype(jnp.int32),
        tile_start_E=tile_start_E.astype(jnp.int32),
        tile_count_E=tiles_E,
        num_rows=buffer_rows,
        tile=tile,
    )
