"""The tiled-scan grouped matmul with V3's FP8 GEMMs per expert tile (jnp reference GEMM).

Rows are expert-sorted and padded so that each tile of `tile` rows belongs to one expert
(model/grouped_matmul.py). Per tile, the three GEMMs of pallas_kernels/fp8_linear.py:

    Fprop  y_t   = Q_rows(x_t)  @ Q_blocks(w[e])      every expert's weights per 128x128 block
    Dgrad  dx_t  = Q_rows(dy_t) @ Q_blocks(w[e])^T    rows per 1x128 tile
    Wgrad  dw[e] += Q_rows(x_t^T) @ Q_cols(dy_t)      per 128 tokens x 1 channel of the tile

Row quantization is per row, so Fprop and Dgrad equal the dense FP8 linear on those rows.
The Wgrad quantizes along the tokens of one tile (at most 128 per scale, fewer when the tile
is smaller), so no scale ever spans two experts; dw[e] sums its tiles in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_grouped_gemm import quantize_weights
from pallas_kernels.fp8_linear import fprop, wgrad


def _tiles(x_PxI: jax.Array, tile: int) -> jax.Array:
    return x_PxI.reshape(x_PxI.shape[0] // tile, tile, x_PxI.shape[1])


def _fprop_tiles(x_PxI, w_q, w_s, tile_expert, used_tiles, tile, pow2_scale):
    """Each used tile times its expert's quantized weights, in f32 [P, O]."""
    out = w_q.shape[-1]

    def one_tile(_, inputs):
        x_tile, expert, index = inputs

        def compute():
            pick = lambda a: jax.lax.dynamic_index_in_dim(a, expert, keepdims=False)
            return fprop(x_tile, pick(w_q), pick(w_s), pow2_scale=pow2_scale)

        def skip():
            return jnp.zeros((tile, out), jnp.float32)

        return None, jax.lax.cond(index < used_tiles, compute, skip)

    x_tiles = _tiles(x_PxI, tile)
    indices = jnp.arange(x_tiles.shape[0], dtype=jnp.int32)
    _, y_tiles = jax.lax.scan(one_tile, None, (x_tiles, tile_expert, indices))
    return y_tiles.reshape(x_PxI.shape[0], out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fp8_tiled_scan(x_PxI, w_ExIxO, tile_expert, used_tiles, tile, pow2_scale):
    """[P, I] rows (tiles of one expert) x [E, I, O] -> [P, O] in x's dtype, all GEMMs FP8."""
    return _fwd(x_PxI, w_ExIxO, tile_expert, used_tiles, tile, pow2_scale)[0]


def _fwd(x_PxI, w_ExIxO, tile_expert, used_tiles, tile, pow2_scale):
    w_q, w_s = quantize_weights(w_ExIxO, pow2_scale)
    y = _fprop_tiles(x_PxI, w_q, w_s, tile_expert, used_tiles, tile, pow2_scale)
    residuals = (x_PxI, w_q, w_s, tile_expert, used_tiles, jnp.zeros((0,), w_ExIxO.dtype))
    return y.astype(x_PxI.dtype), residuals


def _bwd(tile, pow2_scale, residuals, dy_PxO):
    x_PxI, w_q, w_s, tile_expert, used_tiles, w_dtype = residuals
    # Q_blocks(w^T) is Q_blocks(w)^T: the same blocks with the same amax.
    w_qt, w_st = jnp.swapaxes(w_q, 1, 2), jnp.swapaxes(w_s, 1, 2)
    dx = _fprop_tiles(dy_PxO, w_qt, w_st, tile_expert, used_tiles, tile, pow2_scale)

    def one_tile(dw_ExIxO, inputs):
        x_tile, dy_tile, expert, index = inputs

        def accumulate():
            old = jax.lax.dynamic_index_in_dim(dw_ExIxO, expert, keepdims=False)
            new = old + wgrad(x_tile, dy_tile, pow2_scale=pow2_scale)
            return jax.lax.dynamic_update_index_in_dim(dw_ExIxO, new, expert, 0)

        return jax.lax.cond(index < used_tiles, accumulate, lambda: dw_ExIxO), None

    indices = jnp.arange(x_PxI.shape[0] // tile, dtype=jnp.int32)
    inputs = (_tiles(x_PxI, tile), _tiles(dy_PxO, tile), tile_expert, indices)
    dw_shape = (w_q.shape[0], x_PxI.shape[1], w_q.shape[2])
    dw, _ = jax.lax.scan(one_tile, jnp.zeros(dw_shape, jnp.float32), inputs)
    return dx.astype(x_PxI.dtype), dw.astype(w_dtype.dtype), None, None


fp8_tiled_scan.defvjp(_fwd, _bwd)
