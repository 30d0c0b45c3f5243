"""Grouped GEMM over expert-sorted rows (the MoE expert matmul) as Pallas kernels.

    out[m] = rows[m] @ weights[e(m)],   e(m) = the expert whose contiguous group holds row m

`rows_MxK` holds each expert's rows contiguously in expert order, `group_sizes_E` says how
many (as `jax.lax.ragged_dot`, which is `grouped_gemm_reference`); rows past
sum(group_sizes) give zeros. Empty experts are allowed.

Design (never compiled or run on a device here: CI is CPU-only, interpret mode; the Triton
lowering is checked from CPU by tests/test_kernel_lowering.py):
- Tiles of one expert each: the wrapper scatters the rows into a buffer where each group is
  padded to a multiple of block_m and builds a tile -> expert map with jnp outside the
  kernel (`sort_by_expert.tile_sorted_rows`, shared with model/grouped_matmul.py's tiled
  scan). The buffer has a static bound of cdiv(M, block_m) + min(E, M) tiles; tiles past
  the used ones write zeros without a dot.
  Megablox (jax.experimental.pallas.ops.tpu.megablox) instead visits tiles shared by two
  groups twice with row masks and accumulates across consecutive grid steps; that relies on
  the TPU's sequential grid, which Triton's parallel programs do not have. Padding costs one
  row scatter in and one gather out (M x K and M x N elements) plus < block_m rows per expert.
- The expert is picked inside the kernel (w_ref[e] with e read from the tile map), with the
  weights' E and K axes resident in the block and N tiled. No scalar prefetch, which only
  Mosaic TPU has: on GPU the block is a global-memory pointer, so this form costs nothing; on
  TPU it would hold E x K x block_n in VMEM. The TPU build, pallas_kernels/grouped_gemm_tpu.py
  (variant="tpu", the default on a TPU backend; interpret-tested only), picks the expert in a
  scalar-prefetched index_map and tiles K.
- Full-K panels per program, consumed in block_k-wide slices (a fori_loop) with float32
  accumulation: Triton, which the generic build targets on GPU (`generic_compiler_params`),
  lowers only power-of-two operand shapes, so K is zero-padded to a block_k multiple and no
  dot ever sees the whole (e.g. 7168-wide) K. Block sizes must be powers of two on GPU.
- Backward (custom_vjp): dX is the same kernel with w transposed; dW[e] = X_e^T dY_e is a
  second kernel, one program per (expert, K tile, N tile), looping over that expert's row
  tiles (a dynamic trip count; zero for empty experts) with a float32 accumulator.
FP8 block-scaled variant (all three GEMMs in FP8, same tiles): pallas_kernels/fp8_grouped_gemm.py
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._blocks import (
    check_positive_fields,
    generic_compiler_params,
    kernel_variant,
    round_up,
)
from pallas_kernels.sort_by_expert import TiledRows, tile_sorted_rows

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per tile (block_m: every group is padded to it), output columns per program
    (block_n), and K columns per program of the weight-gradient kernel (block_k)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128

    def __post_init__(self):
        check_positive_fields(self)


def _default_block_sizes(m: int) -> BlockSizes:
    # Few rows (tests, decode) should not pad every group to 128 rows.
    block_m = min(128, max(8, pl.next_power_of_2(max(1, m // 8))))
    return BlockSizes(block_m=block_m)


def _check_operands(rows, weights, group_sizes) -> tuple[int, int, int, int]:
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D [M, K], got shape {rows.shape}")
    if weights.ndim != 3:
        raise ValueError(f"weights must be 3-D [E, K, N], got shape {weights.shape}")
    for name, x in (("rows", rows), ("weights", weights)):
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")
    (m, k), (e, k_w, n) = rows.shape, weights.shape
    if k != k_w:
        raise ValueError(f"contracting dims differ: rows is {rows.shape}, weights {weights.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer) or group_sizes.shape != (e,):
        raise ValueError(
            f"group_sizes must be an integer array of shape ({e},) (one size per expert), "
            f"got {group_sizes.dtype}{list(group_sizes.shape)}"
        )
    return m, k, n, e


def _to_buffer(x_MxC: jax.Array, layout: TiledRows) -> jax.Array:
    buffer = jnp.zeros((layout.num_rows, x_MxC.shape[1]), x_MxC.dtype)
    return buffer.at[layout.dest_M].set(x_MxC, mode="drop")


def _from_buffer(x_PxC: jax.Array, layout: TiledRows) -> jax.Array:
    return jnp.take(x_PxC, layout.dest_M, axis=0, mode="fill", fill_value=0)


def _gmm_kernel(te_ref, used_ref, x_ref, w_ref, o_ref, *, block_k: int):
    """One (block_m, block_n) output tile: the tile's rows times its expert's weights, summed
    over block_k-wide K slices in float32 (Triton needs power-of-two operand shapes, and
    V3's K = 7168 is not one).

    te_ref (1,) int32 expert of this tile, used_ref (1,) int32, x_ref (bm, K),
    w_ref (E, K, bn), o_ref (bm, bn); K a multiple of block_k.
    """

    @pl.when(pl.program_id(0) < used_ref[0])
    def _():
        e = te_ref[0]

        def body(kb, acc):
            ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
            return acc + jnp.dot(x_ref[:, ks], w_ref[e, ks, :], preferred_element_type=jnp.float32)

        num_k = x_ref.shape[1] // block_k
        acc = lax.fori_loop(0, num_k, body, jnp.zeros(o_ref.shape, jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(pl.program_id(0) >= used_ref[0])
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _gmm_call(x_PxK, w_ExKxN, layout: TiledRows, bs: BlockSizes, out_dtype, interpret):
    """Tile-padded buffer [P, K] x [E, K, N] -> [P, N] (K and N zero-padded to block_k and
    block_n multiples inside)."""
    p, k = x_PxK.shape
    e, _, n = w_ExKxN.shape
    k_pad, n_pad = round_up(k, bs.block_k), round_up(n, bs.block_n)
    x = jnp.pad(x_PxK, ((0, 0), (0, k_pad - k)))
    w = jnp.pad(w_ExKxN, ((0, 0), (0, k_pad - k), (0, n_pad - n)))
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, block_k=bs.block_k),
        out_shape=jax.ShapeDtypeStruct((p, n_pad), out_dtype),
        grid=(p // bs.block_m, n_pad // bs.block_n),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((1,), lambda i, j: (0,)),
            pl.BlockSpec((bs.block_m, k_pad), lambda i, j: (i, 0)),
            pl.BlockSpec((e, k_pad, bs.block_n), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j: (i, j)),
        compiler_params=generic_compiler_params(),
        interpret=interpret,
    )(layout.tile_expert, layout.used_tiles, x, w)
    return out[:, :n]


def _tgmm_kernel(start_ref, count_ref, x_ref, dy_ref, o_ref, *, block_m: int):
    """dW[e] tile (bk, bn) = sum over expert e's row tiles of x_tile^T dy_tile, in float32.

    start_ref/count_ref (E,) int32, x_ref (P, bk), dy_ref (P, bn), o_ref (bk, bn).
    """
    e = pl.program_id(0)
    start = start_ref[e]

    def body(t, acc):
        rows = pl.ds(pl.multiple_of((start + t) * block_m, block_m), block_m)
        x, dy = x_ref[rows, :], dy_ref[rows, :]
        return acc + lax.dot_general(
            x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, count_ref[e], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tgmm_call(x_PxK, dy_PxN, layout: TiledRows, bs: BlockSizes, interpret):
    """Per-expert X^T dY over the tile-padded buffers -> [E, K, N] float32."""
    (p, k), n = x_PxK.shape, dy_PxN.shape[1]
    num_experts = layout.tile_count_E.shape[0]
    k_pad, n_pad = round_up(k, bs.block_k), round_up(n, bs.block_n)
    x = jnp.pad(x_PxK, ((0, 0), (0, k_pad - k)))
    dy = jnp.pad(dy_PxN, ((0, 0), (0, n_pad - n)))
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=bs.block_m),
        out_shape=jax.ShapeDtypeStruct((num_experts, k_pad, n_pad), jnp.float32),
        grid=(num_experts, k_pad // bs.block_k, n_pad // bs.block_n),
        in_specs=[
            pl.BlockSpec((num_experts,), lambda g, i, j: (0,)),
            pl.BlockSpec((num_experts,), lambda g, i, j: (0,)),
            pl.BlockSpec((p, bs.block_k), lambda g, i, j: (0, i)),
            pl.BlockSpec((p, bs.block_n), lambda g, i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((None, bs.block_k, bs.block_n), lambda g, i, j: (g, i, j)),
        compiler_params=generic_compiler_params(),
        interpret=interpret,
    )(layout.tile_start_E, layout.tile_count_E, x, dy)
    return out[:, :k, :n]


# -- custom_vjp wiring (shared by the builds) ----------------------------------------------


class GemmKernels(NamedTuple):
    """One build's three passes over the tile-padded buffers (P rows, tiles of one expert)."""

    matmul: Callable  # (x [P, K], w [E, K, N], layout, bs, out_dtype, interpret) -> [P, N]
    matmul_wt: Callable  # (dy [P, N], w [E, K, N], layout, bs, out_dtype, interpret) -> [P, K]
    weight_grad: Callable  # (x [P, K], dy [P, N], layout, bs, interpret) -> [E, K, N] f32


def custom_vjp_gemm(kernels: GemmKernels, name: str) -> Callable:
    """(rows, weights, group_sizes, bs, out_dtype, interpret) -> [M, N] with the VJP
    dX = dY W^T (matmul_wt) and dW[e] = X_e^T dY_e (weight_grad), on `kernels`. `name` labels
    the custom_vjp_call in jaxprs and profiles."""

    def forward(rows, weights, group_sizes, bs, out_dtype, interpret):
        layout = tile_sorted_rows(group_sizes, rows.shape[0], bs.block_m)
        x_buf = _to_buffer(rows, layout)
        y_buf = kernels.matmul(x_buf, weights, layout, bs, out_dtype, interpret)
        return _from_buffer(y_buf, layout), (x_buf, weights, layout)

    def backward(bs, out_dtype, interpret, residuals, dy):
        x_buf, weights, layout = residuals
        dy_buf = _to_buffer(dy, layout)
        dx_buf = kernels.matmul_wt(dy_buf, weights, layout, bs, x_buf.dtype, interpret)
        dw = kernels.weight_grad(x_buf, dy_buf, layout, bs, interpret)
        return _from_buffer(dx_buf, layout), dw.astype(weights.dtype), None

    def gemm(rows, weights, group_sizes, bs, out_dtype, interpret):
        return forward(rows, weights, group_sizes, bs, out_dtype, interpret)[0]

    gemm.__name__ = gemm.__qualname__ = name
    gemm = jax.custom_vjp(gemm, nondiff_argnums=(3, 4, 5))
    gemm.defvjp(forward, backward)
    return gemm


def _gmm_t_call(dy_PxN, w_ExKxN, layout, bs, out_dtype, interpret):
    return _gmm_call(dy_PxN, jnp.swapaxes(w_ExKxN, 1, 2), layout, bs, out_dtype, interpret)


_grouped_gemm = custom_vjp_gemm(GemmKernels(_gmm_call, _gmm_t_call, _tgmm_call), "_grouped_gemm")


@functools.partial(jax.jit, static_argnames=("block_sizes", "out_dtype", "interpret", "variant"))
def grouped_gemm(
    rows_MxK: jax.Array,
    weights_ExKxN: jax.Array,
    group_sizes_E: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    out_dtype=None,
    interpret: bool | pltpu.InterpretParams = False,
    variant: str = "auto",
) -> jax.Array:
    """Rows of expert e (contiguous, group_sizes_E[e] of them) times weights[e] -> [M, N].

    variant: "generic" (this file's kernels), "tpu" (grouped_gemm_tpu.py's), or "auto" ("tpu"
    on a TPU backend). interpret: True, or pltpu.InterpretParams() (the TPU interpreter)."""
    m, _, _, _ = _check_operands(rows_MxK, weights_ExKxN, group_sizes_E)
    bs = block_sizes or _default_block_sizes(m)
    out_dtype = out_dtype or jnp.result_type(rows_MxK.dtype, weights_ExKxN.dtype)
    gemm = _grouped_gemm
    if kernel_variant(variant) == "tpu":
        from pallas_kernels import grouped_gemm_tpu  # lazy: it imports this module

        gemm = grouped_gemm_tpu.grouped_gemm_tpu
    return gemm(rows_MxK, weights_ExKxN, group_sizes_E, bs, out_dtype, interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def grouped_gemm_reference(
    rows_MxK: jax.Array, weights_ExKxN: jax.Array, group_sizes_E: jax.Array, *, out_dtype=None
) -> jax.Array:
    """`jax.lax.ragged_dot` with float32 accumulation: the kernel's math and row layout."""
    _check_operands(rows_MxK, weights_ExKxN, group_sizes_E)
    out_dtype = out_dtype or jnp.result_type(rows_MxK.dtype, weights_ExKxN.dtype)
    out = lax.ragged_dot(
        rows_MxK,
        weights_ExKxN,
        group_sizes_E.astype(jnp.int32),
        preferred_element_type=jnp.float32,
    )
    return out.astype(out_dtype)
