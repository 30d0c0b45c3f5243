"""Expert-sorted token layout and the grouped matmul over it, chosen per backend.

Token copies (one per chosen expert) are gathered into rows sorted by expert. With
`tile > 1` each expert's group is padded to a multiple of `tile` so that every tile of rows
belongs to one expert: on CPU a `lax.scan` over tiles (weights picked per tile, unused tiles
skipped) runs near dense-matmul speed where `ragged_dot` does not. On GPU/TPU `ragged_dot`
takes the unpadded layout (`tile == 1`). Both cost in proportion to the routed rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from model.config import FP8Config, GroupedMatmul
from model.fp8_grouped import fp8_tiled_scan
from pallas_kernels import sort_by_expert as expert_order


@struct.dataclass
class ExpertRowBuffer:
    """Where each token copy sits in the expert-sorted (possibly padded) row buffer."""

    dest_M: jax.Array  # row of token copy m = n * K + k in the buffer
    source_P: jax.Array  # token feeding each buffer row; N for padding rows
    group_sizes_E: jax.Array  # rows per expert in the buffer (padded sizes when tiled)
    tile_expert: jax.Array  # expert owning each tile
    used_tiles: jax.Array  # number of tiles holding real rows
    tile: int = struct.field(pytree_node=False)


# On CPU, running every expert on every token (model.moe.dense_experts) beats the tiled
# scan's per-tile overhead up to about this many token x expert rows: decode batches (v3-tiny
# decode at 8 tokens: ~2x faster per MoE layer), not training batches.
DENSE_MAX_ROWS = 1024


def resolve(
    impl: GroupedMatmul, num_tokens: int, num_experts: int, fp8: bool = False
) -> GroupedMatmul:
    """AUTO: ragged_dot on GPU/TPU; on CPU dense for few tokens (decode), else the tiled scan.

    With fp8, AUTO never picks ragged_dot (it has no FP8 form here): the tiled scan instead.
    """
    if impl is not GroupedMatmul.AUTO:
        return impl
    if jax.default_backend() != "cpu":
        return GroupedMatmul.TILED_SCAN if fp8 else GroupedMatmul.RAGGED_DOT
    if num_tokens * num_experts <= DENSE_MAX_ROWS:
        return GroupedMatmul.DENSE
    return GroupedMatmul.TILED_SCAN


def choose_tile(num_rows: int, num_experts: int, max_tile: int = 256) -> int:
    """A power of two near a quarter of the mean rows per expert, in [8, max_tile].

    Each expert's group is padded to a tile multiple (~E * tile / 2 wasted rows), so tiles
    well below the mean group size keep the padding near 12%; the bench sweeps this.
    """
    target = max(1, num_rows // (4 * num_experts))
    tile = 8
    while tile * 2 <= target and tile * 2 <= max_tile:
        tile *= 2
    return min(tile, max_tile)


def sort_by_expert(experts_NxK: jax.Array, num_experts: int, tile: int) -> ExpertRowBuffer:
    """Where the chosen experts' token copies of N tokens sit in the expert-sorted buffer
    (pallas_kernels/sort_by_expert.py's sort, each group padded to `tile` rows)."""
    N, K = experts_NxK.shape
    M = N * K
    rows = expert_order.sort_by_expert(experts_NxK.reshape(M), num_experts)
    tiled = expert_order.tile_sorted_rows(rows.sizes_G, M, tile)
    dest_M = tiled.dest_M[rows.position_M]
    source_P = jnp.full((tiled.num_rows,), N, jnp.int32).at[dest_M].set(jnp.arange(M) // K)
    return ExpertRowBuffer(
        dest_M=dest_M,
        source_P=source_P,
        group_sizes_E=tiled.tile_count_E * tile,
        tile_expert=tiled.tile_expert,
        used_tiles=tiled.used_tiles[0],
        tile=tile,
    )


def permute(x_NxD: jax.Array, layout: ExpertRowBuffer) -> jax.Array:
    """Gather token rows into the expert-sorted buffer [P, D] (zeros in padding rows)."""
    padded = jnp.concatenate([x_NxD, jnp.zeros((1, x_NxD.shape[1]), x_NxD.dtype)])
    return padded[layout.source_P]


def unpermute(y_PxD: jax.Array, layout: ExpertRowBuffer, weights_NxK: jax.Array) -> jax.Array:
    """Weighted sum of each token's expert outputs back in token order [N, D]."""
    N, K = weights_NxK.shape
    copies_NxKxD = y_PxD[layout.dest_M].reshape(N, K, -1)
    return jnp.einsum("nkd,nk->nd", copies_NxKxD, weights_NxK.astype(y_PxD.dtype))


def _tiles(x_PxI: jax.Array, tile: int) -> jax.Array:
    return x_PxI.reshape(x_PxI.shape[0] // tile, tile, x_PxI.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_scan(x_PxI, w_ExIxO, tile_expert, used_tiles, tile):
    """Each tile of `tile` rows times its expert's weights; tiles past used_tiles give zeros."""
    x_tiles = _tiles(x_PxI, tile)

    def one_tile(_, inputs):
        x_tile, expert, index = inputs

        def compute():
            return x_tile @ jax.lax.dynamic_index_in_dim(w_ExIxO, expert, keepdims=False)

        def skip():
            return jnp.zeros((tile, w_ExIxO.shape[-1]), x_tile.dtype)

        return None, jax.lax.cond(index < used_tiles, compute, skip)

    indices = jnp.arange(x_tiles.shape[0], dtype=jnp.int32)
    _, y_tiles = jax.lax.scan(one_tile, None, (x_tiles, tile_expert, indices))
    return y_tiles.reshape(x_PxI.shape[0], -1)


def _tiled_scan_fwd(x_PxI, w_ExIxO, tile_expert, used_tiles, tile):
    y = _tiled_scan(x_PxI, w_ExIxO, tile_expert, used_tiles, tile)
    return y, (x_PxI, w_ExIxO, tile_expert, used_tiles)


def _tiled_scan_bwd(tile, residuals, dy_PxO):
    # Autodiff of the forward scan would build a full [E, I, O] zero buffer per tile; here the
    # weight gradient is accumulated in place into its expert's slice instead.
    x_PxI, w_ExIxO, tile_expert, used_tiles = residuals
    dx = _tiled_scan(dy_PxO, jnp.swapaxes(w_ExIxO, 1, 2), tile_expert, used_tiles, tile)

    def one_tile(dw_ExIxO, inputs):
        x_tile, dy_tile, expert, index = inputs

        def accumulate():
            old = jax.lax.dynamic_index_in_dim(dw_ExIxO, expert, keepdims=False)
            new = old + jnp.dot(x_tile.T, dy_tile, preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_index_in_dim(dw_ExIxO, new, expert, 0)

        return jax.lax.cond(index < used_tiles, accumulate, lambda: dw_ExIxO), None

    indices = jnp.arange(x_PxI.shape[0] // tile, dtype=jnp.int32)
    inputs = (_tiles(x_PxI, tile), _tiles(dy_PxO, tile), tile_expert, indices)
    # Accumulate in float32 so bf16 compute does not round the sum over an expert's tiles.
    dw, _ = jax.lax.scan(one_tile, jnp.zeros(w_ExIxO.shape, jnp.float32), inputs)
    return dx, dw.astype(w_ExIxO.dtype), None, None


_tiled_scan.defvjp(_tiled_scan_fwd, _tiled_scan_bwd)


def grouped_matmul(
    x_PxI: jax.Array,
    w_ExIxO: jax.Array,
    layout: ExpertRowBuffer,
    impl: GroupedMatmul,
    fp8: FP8Config | None = None,
) -> jax.Array:
    """Rows of expert e times w[e]: [P, I] x [E, I, O] -> [P, O] (RAGGED_DOT or TILED_SCAN).

    fp8 (TILED_SCAN only): V3's FP8 GEMMs per tile, see model/fp8_grouped.py.
    """
    if impl is GroupedMatmul.RAGGED_DOT:
        if fp8 is not None:
            raise ValueError(
                "FP8 routed experts need grouped_matmul TILED_SCAN or DENSE, not RAGGED_DOT"
            )
        return jax.lax.ragged_dot(x_PxI, w_ExIxO, layout.group_sizes_E)
    if impl is not GroupedMatmul.TILED_SCAN:
        raise ValueError(f"grouped_matmul takes RAGGED_DOT or TILED_SCAN, got {impl}")
    if layout.tile == 1:
        raise ValueError("the tiled-scan grouped matmul needs a layout built with tile > 1")
    args = (x_PxI, w_ExIxO, layout.tile_expert, layout.used_tiles, layout.tile)
    if fp8 is not None:
        return fp8_tiled_scan(*args, fp8.pow2_scale)
    return _tiled_scan(*args)
