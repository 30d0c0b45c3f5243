"""The MoE grouped GEMM with all three GEMMs in FP8 at DeepSeek-V3's granularity (3.3).

    out[m] = rows[m] @ weights[e(m)]   (the `grouped_gemm` contract: expert-sorted rows,
                                        `group_sizes_E` per expert, zeros past their sum)

computed as pallas_kernels/fp8_linear.py computes one linear, per expert:

    Fprop  y  = Q_rows(x)  @ Q_blocks(w[e])     x per 1x128 tile, w[e] per 128x128 block
    Dgrad  dx = Q_rows(dy) @ Q_blocks(w[e])^T   dy per 1x128 tile; Q_blocks(w^T) = Q_blocks(w)^T
    Wgrad  dw[e] = sum over e's row tiles t of Q_cols(x_t)^T @ Q_cols(dy_t)
                                                x and dy per (tokens of tile t) x 1 channel

Every GEMM accumulates in float32 with the scales applied per 128-wide K block (the
`fp8_gemm` contract); dW comes back in the weights' dtype (f32 master weights: an f32 dW
summed over the expert's tiles in f32), dX in the rows' dtype.

Tiles and the Wgrad's scales. As in pallas_kernels/grouped_gemm.py, each expert's rows are
padded to a multiple of `block_m` (zero rows) so that every tile of block_m rows belongs to
one expert. The Wgrad contracts over tokens, so its operands are quantized down each column
over the rows of one tile: with block_m <= 128 one scale per channel per tile (a tile's
block_m x 1 "128x1" tile holds block_m tokens, zero-padded ones included, which never raise
an amax); with block_m a multiple of 128, one per 128 rows of the tile. Other block_m values
(> 128, not a multiple of 128) are rejected. No scale spans two experts. This is exactly
model/fp8_grouped.py's convention with tile = block_m (it quantizes the transposed tile with
`quantize_rows`, block 128), so the two compute the same codes and scales and differ only in
float32 summation order. Fprop and Dgrad scales are per row and do not depend on block_m.

Design (never compiled or run on a device here: CI is CPU-only, interpret mode; the Triton
lowering is checked from CPU by tests/test_kernel_lowering.py):
- Quantization is jnp outside the kernels (as fp8_linear does), on the tile-padded buffers
  (`sort_by_expert.tile_sorted_rows`; padding rows are zeros and give zero codes): rows per
  1x128, the Wgrad's column tiles; weights once per expert (vmapped `quantize_blocks`).
- Fprop/Dgrad kernel: grid (tiles, N / block_n) with grouped_gemm's tile -> expert map and
  `pl.when` for unused tiles; each used tile runs fp8_gemm.py's block loop (a `fori_loop`
  over 128-wide K blocks: dot of the codes, times the rows' and the expert's block scales,
  added to an f32 accumulator) on its expert's weights, the expert index in the same load
  as the K slice (Triton's lowering takes one indexer per load). The weight scales are
  expanded to one per column in the wrapper (E * K/128 * N floats), which frees block_n from
  128; FP8 codes go to the dot directly on sm_89+ GPUs, else upcast to bfloat16 (exact).
- Wgrad kernel: one program per (expert, K tile, N tile), looping over that expert's column
  tiles (a dynamic trip count, zero for empty experts) as `grouped_gemm`'s dW kernel does:
  acc += (x_t^T dy_t) * sx_t[:, None] * sdy_t[None, :], in float32.
- K and N need not be multiples of 128 or of the block sizes: codes are zero-padded (zero
  codes add nothing whatever their scale) and the results sliced back.

`fp8_grouped_gemm_reference` is the same quantization and math in jnp, with the same
custom VJP: per 128-wide K block a `lax.ragged_dot` of the codes (exact products, f32 sums),
scaled per row and per expert block; the Wgrad as one einsum per column tile summed per
expert. Kernel and reference differ only in float32 summation order.
`fp8_grouped_gemm_fprop` (and `_fprop_reference`) is the Fprop alone on given codes and
scales, as `fp8_gemm` takes them (no VJP; experiments/bench/kernels.py times it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._blocks import (
    cdiv,
    check_positive_fields,
    generic_compiler_params,
    round_up,
)
from pallas_kernels.fp8 import FP8_DTYPE, quantize_blocks, quantize_rows
from pallas_kernels.fp8_gemm import _feed_fp8_to_dot
from pallas_kernels.fp8_gemm import _kernel as _fp8_block_loop
from pallas_kernels.grouped_gemm import (
    _check_operands,
    _from_buffer,
    _to_buffer,
)
from pallas_kernels.sort_by_expert import TiledRows, tile_sorted_rows

QBLOCK = 128  # V3's scale granularity: 1x128 tiles, 128x128 blocks, 128x1 tiles


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per tile (block_m: every group is padded to it, and the Wgrad's column scales
    span the rows of one tile), output columns per program (block_n), and K columns per
    program of the weight-gradient kernel (block_k).

    block_m must be <= 128 or a multiple of 128 (see the module docstring).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128

    def __post_init__(self):
        check_positive_fields(self)
        if self.block_m > QBLOCK and self.block_m % QBLOCK:
            raise ValueError(
                f"BlockSizes.block_m must be <= {QBLOCK} or a multiple of {QBLOCK} (the Wgrad "
                f"quantizes {QBLOCK} tokens of one tile per scale), got {self.block_m}"
            )

    @property
    def wgrad_rows(self) -> int:
        """Tokens per Wgrad scale: the rows of one tile, at most 128."""
        return min(self.block_m, QBLOCK)


def quantize_weights(w_ExKxN: jax.Array, pow2_scale: bool = False):
    """Each expert per 128x128 block: [E, K, N] -> (q [E, K, N] e4m3, s [E, K/128, N/128])."""
    return jax.vmap(functools.partial(quantize_blocks, pow2_scale=pow2_scale))(w_ExKxN)


def quantize_tile_cols(x_PxC: jax.Array, rows: int, pow2_scale: bool = False):
    """Per `rows` x 1 tile down each column of consecutive row tiles (rows <= 128):
    [P, C] -> (q [P, C] e4m3, s [P / rows, C] f32).

    `quantize_rows` of each transposed tile, as fp8_linear's Wgrad quantizes x^T (so
    model/fp8_grouped.py's per-tile Wgrad gets bit-identical codes and scales)."""
    p, c = x_PxC.shape
    if rows > QBLOCK or p % rows:
        raise ValueError(f"quantize_tile_cols: rows={rows} must be <= {QBLOCK} and divide {p}")
    tiles_TxCxR = jnp.swapaxes(x_PxC.reshape(p // rows, rows, c), 1, 2)
    q, s = quantize_rows(tiles_TxCxR, block=QBLOCK, pow2_scale=pow2_scale)
    return jnp.swapaxes(q, 1, 2).reshape(p, c), s[..., 0]


# -- kernels -------------------------------------------------------------------------------


def _fp8_gmm_kernel(te_ref, used_ref, x_ref, sx_ref, w_ref, sw_ref, o_ref, *, num_k_blocks, upcast):
    """One (block_m, block_n) output tile: fp8_gemm's K-block loop on the tile's expert.

    te_ref (1,) expert of this tile, used_ref (1,), x_ref (bm, K') e4m3, sx_ref (bm, Kb') f32,
    w_ref (E, K', bn) e4m3, sw_ref (E, Kb', bn) f32 (per column), o_ref (bm, bn).
    """

    @pl.when(pl.program_id(0) < used_ref[0])
    def _():
        e = te_ref[0]
        _fp8_block_loop(
            x_ref,
            sx_ref,
            w_ref,
            sw_ref,
            o_ref,
            num_k_blocks=num_k_blocks,
            block_k=QBLOCK,
            upcast=upcast,
            b_index=(e,),
        )

    @pl.when(pl.program_id(0) >= used_ref[0])
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _fp8_gmm_call(x_q, x_s, w_q, w_s, layout: TiledRows, bs: BlockSizes, out_dtype, interpret):
    """Buffer codes [P, K] (scales [P, K/128]) x expert codes [E, K, N] (scales
    [E, K/128, N/128]) -> [P, N] out_dtype."""
    p, k = x_q.shape
    e, _, n = w_q.shape
    kb = cdiv(k, QBLOCK)
    kb_pad = pl.next_power_of_2(kb)  # Triton tiles (the full scale panel) are powers of two
    k_pad, n_pad = kb * QBLOCK, round_up(n, bs.block_n)
    x = jnp.pad(x_q, ((0, 0), (0, k_pad - k)))
    sx = jnp.pad(x_s, ((0, 0), (0, kb_pad - kb)))
    w = jnp.pad(w_q, ((0, 0), (0, k_pad - k), (0, n_pad - n)))
    sw = jnp.repeat(w_s, QBLOCK, axis=2)[:, :, :n]
    sw = jnp.pad(sw, ((0, 0), (0, kb_pad - kb), (0, n_pad - n)))
    kernel = functools.partial(
        _fp8_gmm_kernel,
        num_k_blocks=kb,
        upcast=None if _feed_fp8_to_dot(interpret) else jnp.bfloat16,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p, n_pad), out_dtype),
        grid=(p // bs.block_m, n_pad // bs.block_n),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((1,), lambda i, j: (0,)),
            pl.BlockSpec((bs.block_m, k_pad), lambda i, j: (i, 0)),
            pl.BlockSpec((bs.block_m, kb_pad), lambda i, j: (i, 0)),
            pl.BlockSpec((e, k_pad, bs.block_n), lambda i, j: (0, 0, j)),
            pl.BlockSpec((e, kb_pad, bs.block_n), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j: (i, j)),
        compiler_params=generic_compiler_params(),
        interpret=interpret,
    )(layout.tile_expert, layout.used_tiles, x, sx, w, sw)
    return out[:, :n]


def _fp8_tgmm_kernel(start_ref, count_ref, x_ref, sx_ref, dy_ref, sdy_ref, o_ref, *, rows, upcast):
    """dW[e] tile (bk, bn) = sum over expert e's column tiles t of the dequantized x_t^T dy_t.

    start_ref/count_ref (E,) int32 (in column tiles of `rows` rows), x_ref (P, bk) e4m3,
    sx_ref (P/rows, bk) f32, dy_ref (P, bn) e4m3, sdy_ref (P/rows, bn) f32, o_ref (bk, bn).
    """
    e = pl.program_id(0)
    start = start_ref[e]

    def body(i, acc):
        t = start + i
        x = x_ref[pl.ds(pl.multiple_of(t * rows, rows), rows), :]
        dy = dy_ref[pl.ds(pl.multiple_of(t * rows, rows), rows), :]
        if upcast is not None:
            x, dy = x.astype(upcast), dy.astype(upcast)
        partial = lax.dot_general(
            x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        sx = sx_ref[pl.ds(t, 1), :]  # (1, bk): this tile's scale of each K channel
        sdy = sdy_ref[pl.ds(t, 1), :]  # (1, bn)
        return acc + (partial * sx.T) * sdy

    acc = lax.fori_loop(0, count_ref[e], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _fp8_tgmm_call(x_q, x_s, dy_q, dy_s, layout: TiledRows, num_experts, bs, interpret):
    """Per-expert Q(X)^T Q(dY) over the buffers' column tiles -> [E, K, N] float32."""
    (p, k), n = x_q.shape, dy_q.shape[1]
    rows = bs.wgrad_rows
    per_tile = bs.block_m // rows
    k_pad, n_pad = round_up(k, bs.block_k), round_up(n, bs.block_n)
    x = jnp.pad(x_q, ((0, 0), (0, k_pad - k)))
    sx = jnp.pad(x_s, ((0, 0), (0, k_pad - k)))
    dy = jnp.pad(dy_q, ((0, 0), (0, n_pad - n)))
    sdy = jnp.pad(dy_s, ((0, 0), (0, n_pad - n)))
    kernel = functools.partial(
        _fp8_tgmm_kernel, rows=rows, upcast=None if _feed_fp8_to_dot(interpret) else jnp.bfloat16
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_experts, k_pad, n_pad), jnp.float32),
        grid=(num_experts, k_pad // bs.block_k, n_pad // bs.block_n),
        in_specs=[
            pl.BlockSpec((num_experts,), lambda g, i, j: (0,)),
            pl.BlockSpec((num_experts,), lambda g, i, j: (0,)),
            pl.BlockSpec((p, bs.block_k), lambda g, i, j: (0, i)),
            pl.BlockSpec((p // rows, bs.block_k), lambda g, i, j: (0, i)),
            pl.BlockSpec((p, bs.block_n), lambda g, i, j: (0, j)),
            pl.BlockSpec((p // rows, bs.block_n), lambda g, i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((None, bs.block_k, bs.block_n), lambda g, i, j: (g, i, j)),
        compiler_params=generic_compiler_params(),
        interpret=interpret,
    )(layout.tile_start_E * per_tile, layout.tile_count_E * per_tile, x, sx, dy, sdy)
    return out[:, :k, :n]


# -- custom_vjp wiring ---------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fp8_grouped_gemm(rows, weights, group_sizes, bs, pow2_scale, out_dtype, interpret):
    return _fwd(rows, weights, group_sizes, bs, pow2_scale, out_dtype, interpret)[0]


def _fwd(rows, weights, group_sizes, bs, pow2_scale, out_dtype, interpret):
    layout = tile_sorted_rows(group_sizes, rows.shape[0], bs.block_m)
    w_q, w_s = quantize_weights(weights, pow2_scale)
    # Rows are quantized in the buffer: per-row scales are the same, and the padding rows
    # (zeros) give zero codes whatever their scale.
    x_buf = _to_buffer(rows, layout)
    x_q, x_s = quantize_rows(x_buf, block=QBLOCK, pow2_scale=pow2_scale)
    y = _from_buffer(_fp8_gmm_call(x_q, x_s, w_q, w_s, layout, bs, out_dtype, interpret), layout)
    # The weights' dtype travels as a zero-size array (residuals must be arrays).
    return y, (x_buf, w_q, w_s, layout, jnp.zeros((0,), weights.dtype))


def _bwd(bs, pow2_scale, out_dtype, interpret, residuals, dy):
    x_buf, w_q, w_s, layout, w_dtype = residuals
    dy_buf = _to_buffer(dy, layout)
    dy_q, dy_s = quantize_rows(dy_buf, block=QBLOCK, pow2_scale=pow2_scale)
    w_qt, w_st = jnp.swapaxes(w_q, 1, 2), jnp.swapaxes(w_s, 1, 2)
    dx = _fp8_gmm_call(dy_q, dy_s, w_qt, w_st, layout, bs, x_buf.dtype, interpret)
    xc_q, xc_s = quantize_tile_cols(x_buf, bs.wgrad_rows, pow2_scale)
    dyc_q, dyc_s = quantize_tile_cols(dy_buf, bs.wgrad_rows, pow2_scale)
    dw = _fp8_tgmm_call(xc_q, xc_s, dyc_q, dyc_s, layout, w_q.shape[0], bs, interpret)
    return _from_buffer(dx, layout), dw.astype(w_dtype.dtype), None


_fp8_grouped_gemm.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("pow2_scale", "block_sizes", "out_dtype", "interpret"))
def fp8_grouped_gemm(
    rows_MxK: jax.Array,
    weights_ExKxN: jax.Array,
    group_sizes_E: jax.Array,
    *,
    pow2_scale: bool = False,
    block_sizes: BlockSizes | None = None,
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array:
    """Rows of expert e (contiguous, group_sizes_E[e] of them) times weights[e] -> [M, N],
    Fprop/Dgrad/Wgrad in FP8 (E4M3, V3's tiles); out_dtype defaults to the operands' type."""
    bs, out_dtype = _resolve(rows_MxK, weights_ExKxN, group_sizes_E, block_sizes, out_dtype)
    args = (bs, pow2_scale, out_dtype, interpret)
    return _fp8_grouped_gemm(rows_MxK, weights_ExKxN, group_sizes_E, *args)


def _resolve(rows, weights, group_sizes, block_sizes, out_dtype) -> tuple[BlockSizes, jnp.dtype]:
    """Checked operands; (block sizes, output dtype) with their defaults filled in."""
    _check_operands(rows, weights, group_sizes)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            "block_sizes must be pallas_kernels.fp8_grouped_gemm.BlockSizes, "
            f"got {type(block_sizes).__name__}"
        )
    if out_dtype is None:
        out_dtype = jnp.result_type(rows.dtype, weights.dtype)
    return block_sizes or BlockSizes(), jnp.dtype(out_dtype)


def _check_codes(x_q, x_s, w_q, w_s, group_sizes) -> None:
    for name, a, ndim in (("x_q", x_q, 2), ("w_q", w_q, 3)):
        if a.dtype != FP8_DTYPE or a.ndim != ndim:
            raise TypeError(
                f"{name} must be {ndim}-D {jnp.dtype(FP8_DTYPE).name} codes, "
                f"got {a.dtype}{list(a.shape)}"
            )
    (m, k), (e, k_w, n) = x_q.shape, w_q.shape
    if k != k_w:
        raise ValueError(f"contracting dims differ: x_q is {x_q.shape}, w_q {w_q.shape}")
    kb, nb = cdiv(k, QBLOCK), cdiv(n, QBLOCK)
    for name, s, shape, tile in (
        ("x_s", x_s, (m, kb), "1x128"),
        ("w_s", w_s, (e, kb, nb), "128x128"),
    ):
        if s.dtype != jnp.float32 or s.shape != shape:
            raise ValueError(
                f"{name} must be float32 of shape {shape} (one scale per {tile} tile), "
                f"got {s.dtype}{list(s.shape)}"
            )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer) or group_sizes.shape != (e,):
        raise ValueError(
            f"group_sizes must be an integer array of shape ({e},), "
            f"got {group_sizes.dtype}{list(group_sizes.shape)}"
        )


@functools.partial(jax.jit, static_argnames=("block_sizes", "out_dtype", "interpret"))
def fp8_grouped_gemm_fprop(
    x_q: jax.Array,
    x_s: jax.Array,
    w_q: jax.Array,
    w_s: jax.Array,
    group_sizes_E: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    out_dtype=jnp.bfloat16,
    interpret: bool = False,
) -> jax.Array:
    """The Fprop kernel alone, on codes (no VJP): x_q [M, K] e4m3 with scales [M, K/128]
    (`quantize_rows`), w_q [E, K, N] e4m3 with [E, K/128, N/128] (`quantize_weights`)."""
    _check_codes(x_q, x_s, w_q, w_s, group_sizes_E)
    bs = block_sizes or BlockSizes()
    layout = tile_sorted_rows(group_sizes_E, x_q.shape[0], bs.block_m)
    out = _fp8_gmm_call(
        _to_buffer(x_q, layout), _to_buffer(x_s, layout), w_q, w_s, layout, bs, out_dtype, interpret
    )
    return _from_buffer(out, layout)


# -- reference -----------------------------------------------------------------------------


def _ragged_fp8_reference(x_q, x_s, w_q, w_s, group_sizes):
    """Per 128-wide K block: ragged_dot of the codes, times the row scales and the expert's
    block scales, summed in f32 -> [M, N]. Rows past sum(group_sizes) give zeros."""
    (m, k), (e, _, n) = x_q.shape, w_q.shape
    kb = cdiv(k, QBLOCK)
    k_pad = kb * QBLOCK
    # bfloat16 holds every E4M3 value exactly, so each product of two codes is exact in f32.
    x_blocks = jnp.pad(x_q, ((0, 0), (0, k_pad - k))).astype(jnp.bfloat16)
    x_blocks = jnp.swapaxes(x_blocks.reshape(m, kb, QBLOCK), 0, 1)  # [Kb, M, 128]
    w_blocks = jnp.pad(w_q, ((0, 0), (0, k_pad - k), (0, 0))).astype(jnp.bfloat16)
    w_blocks = jnp.moveaxis(w_blocks.reshape(e, kb, QBLOCK, n), 1, 0)  # [Kb, E, 128, N]
    sw_cols = jnp.moveaxis(jnp.repeat(w_s, QBLOCK, axis=2)[:, :, :n], 1, 0)  # [Kb, E, N]
    end_E = jnp.cumsum(group_sizes.astype(jnp.int32))
    expert_M = jnp.minimum(jnp.searchsorted(end_E, jnp.arange(m), side="right"), e - 1)
    sizes = group_sizes.astype(jnp.int32)

    def step(acc, xs):
        x_MxB, w_ExBxN, sx_M, sw_ExN = xs
        partial = lax.ragged_dot(x_MxB, w_ExBxN, sizes, preferred_element_type=jnp.float32)
        return acc + (partial * sx_M[:, None]) * sw_ExN[expert_M], None

    init = jnp.zeros((m, n), jnp.float32)
    acc, _ = lax.scan(step, init, (x_blocks, w_blocks, x_s.T, sw_cols))
    return acc


def _wgrad_reference(x, dy, group_sizes, bs: BlockSizes, pow2_scale):
    """sum over expert e's column tiles of (Q(x_t)^T Q(dy_t)) * scales -> [E, K, N] f32."""
    e = group_sizes.shape[0]
    layout = tile_sorted_rows(group_sizes, x.shape[0], bs.block_m)
    rows = bs.wgrad_rows
    x_q, x_s = quantize_tile_cols(_to_buffer(x, layout), rows, pow2_scale)
    dy_q, dy_s = quantize_tile_cols(_to_buffer(dy, layout), rows, pow2_scale)
    tiles = x_q.shape[0] // rows
    x_TxRxK = x_q.astype(jnp.bfloat16).reshape(tiles, rows, -1)
    dy_TxRxN = dy_q.astype(jnp.bfloat16).reshape(tiles, rows, -1)
    partial = jnp.einsum("trk,trn->tkn", x_TxRxK, dy_TxRxN, preferred_element_type=jnp.float32)
    per_tile = (partial * x_s[:, :, None]) * dy_s[:, None, :]
    per_tile_expert = jnp.repeat(layout.tile_expert, bs.block_m // rows)
    used = jnp.arange(tiles) < layout.used_tiles[0] * (bs.block_m // rows)
    return jax.ops.segment_sum(per_tile, jnp.where(used, per_tile_expert, e), num_segments=e)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def fp8_grouped_gemm_fprop_reference(x_q, x_s, w_q, w_s, group_sizes_E, *, out_dtype=jnp.bfloat16):
    """`fp8_grouped_gemm_fprop` in jnp (a ragged_dot per 128-wide K block)."""
    _check_codes(x_q, x_s, w_q, w_s, group_sizes_E)
    return _ragged_fp8_reference(x_q, x_s, w_q, w_s, group_sizes_E).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _reference(rows, weights, group_sizes, bs, pow2_scale, out_dtype):
    return _reference_fwd(rows, weights, group_sizes, bs, pow2_scale, out_dtype)[0]


def _reference_fwd(rows, weights, group_sizes, bs, pow2_scale, out_dtype):
    w_q, w_s = quantize_weights(weights, pow2_scale)
    x_q, x_s = quantize_rows(rows, block=QBLOCK, pow2_scale=pow2_scale)
    y = _ragged_fp8_reference(x_q, x_s, w_q, w_s, group_sizes).astype(out_dtype)
    return y, (rows, w_q, w_s, group_sizes, jnp.zeros((0,), weights.dtype))


def _reference_bwd(bs, pow2_scale, out_dtype, residuals, dy):
    rows, w_q, w_s, group_sizes, w_dtype = residuals
    dy_q, dy_s = quantize_rows(dy, block=QBLOCK, pow2_scale=pow2_scale)
    w_qt, w_st = jnp.swapaxes(w_q, 1, 2), jnp.swapaxes(w_s, 1, 2)
    dx = _ragged_fp8_reference(dy_q, dy_s, w_qt, w_st, group_sizes)
    dw = _wgrad_reference(rows, dy, group_sizes, bs, pow2_scale)
    return dx.astype(rows.dtype), dw.astype(w_dtype.dtype), None


_reference.defvjp(_reference_fwd, _reference_bwd)


@functools.partial(jax.jit, static_argnames=("pow2_scale", "block_sizes", "out_dtype"))
def fp8_grouped_gemm_reference(
    rows_MxK: jax.Array,
    weights_ExKxN: jax.Array,
    group_sizes_E: jax.Array,
    *,
    pow2_scale: bool = False,
    block_sizes: BlockSizes | None = None,
    out_dtype=None,
) -> jax.Array:
    """`fp8_grouped_gemm` in jnp (same quantization, same VJP; block_sizes.block_m sets the
    Wgrad's tiles, the other fields are unused). Memory: the Wgrad holds one [K, N] float32
    partial per tile, so keep it to small shapes."""
    bs, out_dtype = _resolve(rows_MxK, weights_ExKxN, group_sizes_E, block_sizes, out_dtype)
    return _reference(rows_MxK, weights_ExKxN, group_sizes_E, bs, pow2_scale, out_dtype)
