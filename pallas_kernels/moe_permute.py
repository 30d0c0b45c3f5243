"""MoE dispatch / combine data movement as Pallas kernels: permute token copies into
expert-sorted rows, and combine expert outputs back into tokens with their top-k weights.

    permute:  rows[p] = x[copy[p] // K]              (copy = stable argsort of the experts)
    combine:  out[n]  = sum_k weights[dest[n, k]] * rows[dest[n, k]]

Row p of the sorted buffer holds token copy `copy_M[p]` (= n * K + k); copies are grouped by
expert in expert order, and within an expert by token (a stable sort), which is the layout
`grouped_gemm` (pallas_kernels/grouped_gemm.py) and `jax.lax.ragged_dot` take, with
`group_sizes_E` rows per expert. `dest_NxK` is the inverse map. The sort itself is jnp
(pallas_kernels/sort_by_expert.py) outside the kernels; the kernels only move rows by these
precomputed indices.

Design (never compiled here: this repository's CI is CPU-only, interpret mode; the generic
build's Triton lowering is checked by exporting for "cuda", which does not compile):
- Gather kernel: grid (row blocks, D tiles); a program takes block_rows output rows and one
  tile of block_d columns. It reads each row's source index from its index block and copies
  that row's tile of the source, resident in the block, with a dynamic 1-row slice. Combine
  kernel: grid (token blocks, D tiles), K dynamic row-tile reads per token, weighted sum in
  float32. No scalar prefetch (Mosaic TPU only): on GPU the resident source is a
  global-memory pointer, but on TPU it would be held in VMEM whole. The TPU build,
  pallas_kernels/moe_permute_tpu.py (variant="tpu", the default on a TPU backend;
  interpret-tested only), keeps the source in HBM (memory_space=ANY) and DMAs whole rows at
  scalar-prefetched indices; both builds share the index computation and the custom_vjp
  wiring below, which takes the row movers (`RowMovers`) as a parameter.
- Why D tiles: this build targets GPU through Pallas' Triton backend (compiler params from
  `generic_compiler_params()`; without them jax >= 0.10 picks Mosaic GPU, which rejects these
  kernels), and Triton requires every array a load, store or arithmetic op touches to have a
  power-of-two number of elements. A whole row of V3's d_model = 7168 is not one, so the
  kernels move (1, block_d) row pieces, block_d a power of two (`BlockSizes.block_d`,
  validated; narrower rows use the next power of two >= D). D is zero-padded to a multiple
  of the tile outside the kernels and sliced back (a copy of the source only when D is not
  a multiple: 7168 = 28 x 256 is). Nothing else needs the rule: the index and weight blocks
  are read one scalar ((1, 1) weight piece) at a time, so block_rows, block_tokens and the
  top-k K (e.g. 6) may be any positive size.
- Backward (custom_vjp, below the kernels): permute's is the combine kernel with unit
  weights (a scatter-add of each token's K copies); combine's is the gather kernel on the
  output gradient, scaled by the weights, plus d weight[p] = <d out[token(p)], rows[p]>.
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

from pallas_kernels._blocks import (
    check_positive_fields,
    generic_compiler_params,
    kernel_variant,
    round_up,
)
from pallas_kernels.sort_by_expert import sort_by_expert

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _tile_d(d: int, block_d: int) -> tuple[int, int]:
    """(tile width, padded D): block_d, or the next power of two >= D when that is narrower."""
    tile = min(block_d, 1 << max(d - 1, 0).bit_length())
    return tile, round_up(max(d, 1), tile)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per program of the gather kernel, tokens per program of the combine kernel, and
    (generic build only) the width of the D tile one program moves, a power of two; narrower
    rows use the next power of two >= D instead. The TPU build moves whole rows."""

    block_rows: int = 32
    block_tokens: int = 32
    block_d: int = 256

    def __post_init__(self):
        check_positive_fields(self)
        if not _is_pow2(self.block_d):
            raise ValueError(
                f"BlockSizes.block_d must be a power of two (Triton's rule for the arrays a "
                f"kernel loads and stores), got {self.block_d}"
            )


class SortedIndices(NamedTuple):
    """Index maps between token copies (n, k) and expert-sorted rows p."""

    copy_M: jax.Array  # token copy n * K + k held by sorted row p
    dest_NxK: jax.Array  # sorted row of token copy (n, k)


def _check_float(name: str, x: jax.Array) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")


def _check_permute_args(x, experts, weights, num_experts) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {x.shape}")
    _check_float("x", x)
    if experts.ndim != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_idx must be [N, K] with N = {x.shape[0]} (rows of x), got {experts.shape}"
        )
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise TypeError(f"expert_idx must be an integer array, got {experts.dtype}")
    if weights.shape != experts.shape:
        raise ValueError(f"weights shape {weights.shape} must equal expert_idx {experts.shape}")
    _check_float("weights", weights)
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def _check_combine_args(rows, weights_M, indices: SortedIndices) -> None:
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D [M, D], got shape {rows.shape}")
    _check_float("rows", rows)
    _check_float("weights", weights_M)
    m = indices.copy_M.shape[0]
    if rows.shape[0] != m or weights_M.shape != (m,):
        raise ValueError(
            f"rows {rows.shape} and weights {weights_M.shape} must have M = N * K = {m} rows "
            f"(the indices' dest map is {indices.dest_NxK.shape})"
        )


def sort_indices(expert_idx_NxK: jax.Array, num_experts: int) -> tuple[SortedIndices, jax.Array]:
    """Stable expert order of the token copies (jnp argsort) and the rows per expert [E]."""
    n, k = expert_idx_NxK.shape
    rows = sort_by_expert(expert_idx_NxK.reshape(n * k), num_experts)
    return SortedIndices(rows.order_M, rows.position_M.reshape(n, k)), rows.sizes_G


# -- kernels -------------------------------------------------------------------------------


def _gather_kernel(idx_ref, src_ref, o_ref):
    """o[r] = src[idx[r]] on one D tile: idx_ref (br,) int32, src_ref (S, bd) resident,
    o_ref (br, bd); every load and store is one (1, bd) row piece."""

    def body(r, carry):
        o_ref[pl.ds(r, 1), :] = src_ref[pl.ds(idx_ref[r], 1), :]
        return carry

    lax.fori_loop(0, o_ref.shape[0], body, 0)


def _gather_rows(
    src_SxD: jax.Array, idx_R: jax.Array, block_rows: int, interpret: bool, *, block_d: int
):
    """src[idx] -> [R, D] with the gather kernel: grid (row blocks, D tiles)."""
    (s, d), r = src_SxD.shape, idx_R.shape[0]
    bd, d_pad = _tile_d(d, block_d)
    r_pad = round_up(max(r, 1), block_rows)
    idx = jnp.pad(idx_R.astype(jnp.int32), (0, r_pad - r))  # padding rows copy row 0
    src = jnp.pad(src_SxD, ((0, 0), (0, d_pad - d)))  # zero columns, sliced off below
    out = pl.pallas_call(
        _gather_kernel,
        out_shape=jax.ShapeDtypeStruct((r_pad, d_pad), src_SxD.dtype),
        grid=(r_pad // block_rows, d_pad // bd),
        in_specs=[
            pl.BlockSpec((block_rows,), lambda i, j: (i,)),
            pl.BlockSpec((s, bd), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_rows, bd), lambda i, j: (i, j)),
        compiler_params=generic_compiler_params(),
        interpret=interpret,
    )(idx, src)
    return out[:r, :d]


def _combine_kernel(dest_ref, w_ref, rows_ref, o_ref, *, top_k: int):
    """o[t] = sum_k w[t, k] * rows[dest[t, k]] in float32, on one D tile.

    dest_ref (bt, K) int32, w_ref (bt, K) float32, rows_ref (M, bd) resident, o_ref (bt, bd).
    Only scalars of dest/w ((1, 1) weight pieces) and (1, bd) row pieces are loaded, so K
    (top-k, e.g. 6) need not be a power of two.
    """

    def body(t, carry):
        acc = jnp.zeros((1, o_ref.shape[1]), jnp.float32)
        for k in range(top_k):
            row = rows_ref[pl.ds(dest_ref[t, k], 1), :].astype(jnp.float32)
            acc = acc + w_ref[pl.ds(t, 1), pl.ds(k, 1)] * row
        o_ref[pl.ds(t, 1), :] = acc.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, o_ref.shape[0], body, 0)


def _combine_rows(rows_MxD, w_NxK, dest_NxK, block_tokens: int, interpret: bool, *, block_d: int):
    """sum_k w[n, k] * rows[dest[n, k]] -> [N, D] with the combine kernel: grid (token
    blocks, D tiles)."""
    (m, d), (n, k) = rows_MxD.shape, dest_NxK.shape
    bd, d_pad = _tile_d(d, block_d)
    n_pad = round_up(max(n, 1), block_tokens)
    dest = jnp.pad(dest_NxK.astype(jnp.int32), ((0, n_pad - n), (0, 0)))
    w = jnp.pad(w_NxK.astype(jnp.float32), ((0, n_pad - n), (0, 0)))
    rows = jnp.pad(rows_MxD, ((0, 0), (0, d_pad - d)))  # zero columns, sliced off below
    out = pl.pallas_call(
        functools.partial(_combine_kernel, top_k=k),
        out_shape=jax.ShapeDtypeStruct((n_pad, d_pad), rows_MxD.dtype),
        grid=(n_pad // block_tokens, d_pad // bd),
        in_specs=[
            pl.BlockSpec((block_tokens, k), lambda i, j: (i, 0)),
            pl.BlockSpec((block_tokens, k), lambda i, j: (i, 0)),
            pl.BlockSpec((m, bd), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_tokens, bd), lambda i, j: (i, j)),
        compiler_params=generic_compiler_params(),
        interpret=interpret,
    )(dest, w, rows)
    return out[:n, :d]


class RowMovers(NamedTuple):
    """The two row-moving kernels the custom_vjp wiring below runs: this file's, or the TPU
    build's (pallas_kernels/moe_permute_tpu.py)."""

    gather: Callable  # (src [S, D], idx [R], block_rows, interpret) -> src[idx] [R, D]
    combine: Callable  # (rows [M, D], w [N, K], dest [N, K], block_tokens, interpret) -> [N, D]


@functools.cache
def generic_movers(block_d: int = BlockSizes.block_d) -> RowMovers:
    """This file's kernels with D tiles of block_d columns (one object per block_d, so that
    jit's cache of the custom_vjp wiring, which takes the movers as a static argument, hits)."""
    return RowMovers(
        functools.partial(_gather_rows, block_d=block_d),
        functools.partial(_combine_rows, block_d=block_d),
    )


GENERIC_MOVERS = generic_movers()  # the default block_d


def _movers(variant: str, bs: BlockSizes) -> RowMovers:
    if kernel_variant(variant) == "tpu":
        from pallas_kernels import moe_permute_tpu  # lazy: it imports this module

        return moe_permute_tpu.TPU_MOVERS
    return generic_movers(bs.block_d)


# -- public API ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_experts", "block_sizes", "interpret", "variant"))
def permute(
    x_NxD: jax.Array,
    expert_idx_NxK: jax.Array,
    weights_NxK: jax.Array,
    num_experts: int,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    variant: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array, SortedIndices]:
    """Token copies grouped by expert: (rows [N*K, D], weights [N*K], group_sizes [E], indices).

    Expert ids must lie in [0, num_experts); copies of one expert keep token order. variant:
    "generic" (this file's kernels), "tpu" (moe_permute_tpu.py's), or "auto" ("tpu" on a TPU
    backend).
    """
    _check_permute_args(x_NxD, expert_idx_NxK, weights_NxK, num_experts)
    indices, group_sizes_E = sort_indices(expert_idx_NxK, num_experts)
    bs = block_sizes or BlockSizes()
    movers = _movers(variant, bs)
    rows = _permute_rows(x_NxD, indices, bs, interpret, movers)
    weights_M = weights_NxK.reshape(-1)[indices.copy_M]
    return rows, weights_M, group_sizes_E, indices


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "variant"))
def combine(
    rows_MxD: jax.Array,
    weights_M: jax.Array,
    indices: SortedIndices,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    variant: str = "auto",
) -> jax.Array:
    """Weighted un-permute: out[n] = sum_k weights[dest[n, k]] * rows[dest[n, k]] -> [N, D].

    variant as for `permute`."""
    _check_combine_args(rows_MxD, weights_M, indices)
    w_NxK = weights_M[indices.dest_NxK]
    bs = block_sizes or BlockSizes()
    movers = _movers(variant, bs)
    return _combine(rows_MxD, w_NxK, indices, bs, interpret, movers)


@functools.partial(jax.jit, static_argnames=("num_experts",))
def permute_reference(
    x_NxD: jax.Array, expert_idx_NxK: jax.Array, weights_NxK: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array, SortedIndices]:
    """permute in jnp: the same sort, rows gathered with x[token]."""
    _check_permute_args(x_NxD, expert_idx_NxK, weights_NxK, num_experts)
    indices, group_sizes_E = sort_indices(expert_idx_NxK, num_experts)
    k = expert_idx_NxK.shape[1]
    rows = x_NxD[indices.copy_M // k]
    return rows, weights_NxK.reshape(-1)[indices.copy_M], group_sizes_E, indices


@jax.jit
def combine_reference(
    rows_MxD: jax.Array, weights_M: jax.Array, indices: SortedIndices
) -> jax.Array:
    """combine in jnp: gather each token's K rows and weights, sum in float32."""
    _check_combine_args(rows_MxD, weights_M, indices)
    copies_NxKxD = rows_MxD[indices.dest_NxK].astype(jnp.float32)
    w_NxK = weights_M[indices.dest_NxK].astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", copies_NxKxD, w_NxK).astype(rows_MxD.dtype)


# -- custom_vjp wiring ---------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _permute_rows(x_NxD, indices: SortedIndices, bs: BlockSizes, interpret, movers: RowMovers):
    k = indices.dest_NxK.shape[1]
    return movers.gather(x_NxD, indices.copy_M // k, bs.block_rows, interpret)


def _permute_rows_fwd(x_NxD, indices, bs, interpret, movers):
    return _permute_rows(x_NxD, indices, bs, interpret, movers), indices


def _permute_rows_bwd(bs, interpret, movers, indices, d_rows_MxD):
    # Each token's gradient is the unweighted sum of its K copies' gradients.
    ones = jnp.ones(indices.dest_NxK.shape, jnp.float32)
    dx = movers.combine(d_rows_MxD, ones, indices.dest_NxK, bs.block_tokens, interpret)
    return dx, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _combine(rows_MxD, w_NxK, indices: SortedIndices, bs: BlockSizes, interpret, movers):
    return movers.combine(rows_MxD, w_NxK, indices.dest_NxK, bs.block_tokens, interpret)


def _combine_fwd(rows_MxD, w_NxK, indices, bs, interpret, movers):
    out = _combine(rows_MxD, w_NxK, indices, bs, interpret, movers)
    return out, (rows_MxD, w_NxK, indices)


def _combine_bwd(bs, interpret, movers, residuals, d_out_NxD):
    rows_MxD, w_NxK, indices = residuals
    k = indices.dest_NxK.shape[1]
    # Row p fed token copy[p] // K: its gradient is that token's output gradient.
    g_MxD = movers.gather(d_out_NxD, indices.copy_M // k, bs.block_rows, interpret)
    g_MxD = g_MxD.astype(jnp.float32)
    w_M = w_NxK.reshape(-1)[indices.copy_M].astype(jnp.float32)
    d_rows = (g_MxD * w_M[:, None]).astype(rows_MxD.dtype)
    d_w_M = jnp.sum(g_MxD * rows_MxD.astype(jnp.float32), axis=1)
    d_w_NxK = d_w_M[indices.dest_NxK].astype(w_NxK.dtype)
    return d_rows, d_w_NxK, None


_combine.defvjp(_combine_fwd, _combine_bwd)
