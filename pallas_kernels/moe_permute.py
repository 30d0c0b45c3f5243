"""MoE dispatch / combine data movement as Pallas kernels: permute token copies into
expert-sorted rows, and combine expert outputs back into tokens with their top-k weights.

    permute:  rows[p] = x[copy[p] // K]              (copy = stable argsort of the experts)
    combine:  out[n]  = sum_k weights[dest[n, k]] * rows[dest[n, k]]

Row p of the sorted buffer holds token copy `copy_M[p]` (= n * K + k); copies are grouped by
expert in expert order, and within an expert by token (a stable sort), which is the layout
`grouped_gemm` (pallas_kernels/grouped_gemm.py) and `jax.lax.ragged_dot` take, with
`group_sizes_E` rows per expert. `dest_NxK` is the inverse map. The sort itself is jnp
(argsort) outside the kernels; the kernels only move rows by these precomputed indices.

Design (GPU/TPU lowering is untested here: this repository's CI is CPU-only, interpret mode):
- Gather kernel: one program per block of output rows; it reads each row's source index
  from its index block and copies that row of the source, resident in the block, with a
  dynamic 1-row slice. Combine kernel: one program per block of tokens, K dynamic row reads
  per token, weighted sum in float32. No scalar prefetch (Mosaic TPU only): on GPU the
  resident source is a global-memory pointer, but on TPU it would be held in VMEM whole. The
  TPU build, pallas_kernels/moe_permute_tpu.py (variant="tpu", the default on a TPU backend;
  interpret-tested only), keeps the source in HBM (memory_space=ANY) and DMAs rows at
  scalar-prefetched indices; both builds share the index computation and the custom_vjp
  wiring below, which takes the row movers (`RowMovers`) as a parameter.
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

from pallas_kernels._blocks import check_positive_fields, kernel_variant, round_up

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per program of the gather kernel and tokens per program of the combine kernel."""

    block_rows: int = 32
    block_tokens: int = 32

    def __post_init__(self):
        check_positive_fields(self)


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
    flat_M = expert_idx_NxK.reshape(n * k).astype(jnp.int32)
    copy_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
    dest_M = jnp.zeros((n * k,), jnp.int32).at[copy_M].set(jnp.arange(n * k, dtype=jnp.int32))
    group_sizes_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
    return SortedIndices(copy_M, dest_M.reshape(n, k)), group_sizes_E


# -- kernels -------------------------------------------------------------------------------


def _gather_kernel(idx_ref, src_ref, o_ref):
    """o[r] = src[idx[r]] for the block's rows: idx_ref (br,) int32, src_ref (S, D) resident."""

    def body(r, carry):
        o_ref[pl.ds(r, 1), :] = src_ref[pl.ds(idx_ref[r], 1), :]
        return carry

    lax.fori_loop(0, o_ref.shape[0], body, 0)


def _gather_rows(src_SxD: jax.Array, idx_R: jax.Array, block_rows: int, interpret: bool):
    """src[idx] -> [R, D] with the gather kernel."""
    (s, d), r = src_SxD.shape, idx_R.shape[0]
    r_pad = round_up(max(r, 1), block_rows)
    idx = jnp.pad(idx_R.astype(jnp.int32), (0, r_pad - r))  # padding rows copy row 0
    out = pl.pallas_call(
        _gather_kernel,
        out_shape=jax.ShapeDtypeStruct((r_pad, d), src_SxD.dtype),
        grid=(r_pad // block_rows,),
        in_specs=[
            pl.BlockSpec((block_rows,), lambda i: (i,)),
            pl.BlockSpec((s, d), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((block_rows, d), lambda i: (i, 0)),
        interpret=interpret,
    )(idx, src_SxD)
    return out[:r]


def _combine_kernel(dest_ref, w_ref, rows_ref, o_ref, *, top_k: int):
    """o[t] = sum_k w[t, k] * rows[dest[t, k]] in float32.

    dest_ref (bt, K) int32, w_ref (bt, K) float32, rows_ref (M, D) resident, o_ref (bt, D).
    """

    def body(t, carry):
        acc = jnp.zeros((1, o_ref.shape[1]), jnp.float32)
        for k in range(top_k):
            row = rows_ref[pl.ds(dest_ref[t, k], 1), :].astype(jnp.float32)
            acc = acc + w_ref[pl.ds(t, 1), pl.ds(k, 1)] * row
        o_ref[pl.ds(t, 1), :] = acc.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, o_ref.shape[0], body, 0)


def _combine_rows(rows_MxD, w_NxK, dest_NxK, block_tokens: int, interpret: bool):
    """sum_k w[n, k] * rows[dest[n, k]] -> [N, D] with the combine kernel."""
    (m, d), (n, k) = rows_MxD.shape, dest_NxK.shape
    n_pad = round_up(max(n, 1), block_tokens)
    dest = jnp.pad(dest_NxK.astype(jnp.int32), ((0, n_pad - n), (0, 0)))
    w = jnp.pad(w_NxK.astype(jnp.float32), ((0, n_pad - n), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_combine_kernel, top_k=k),
        out_shape=jax.ShapeDtypeStruct((n_pad, d), rows_MxD.dtype),
        grid=(n_pad // block_tokens,),
        in_specs=[
            pl.BlockSpec((block_tokens, k), lambda i: (i, 0)),
            pl.BlockSpec((block_tokens, k), lambda i: (i, 0)),
            pl.BlockSpec((m, d), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((block_tokens, d), lambda i: (i, 0)),
        interpret=interpret,
    )(dest, w, rows_MxD)
    return out[:n]


class RowMovers(NamedTuple):
    """The two row-moving kernels the custom_vjp wiring below runs: this file's, or the TPU
    build's (pallas_kernels/moe_permute_tpu.py)."""

    gather: Callable  # (src [S, D], idx [R], block_rows, interpret) -> src[idx] [R, D]
    combine: Callable  # (rows [M, D], w [N, K], dest [N, K], block_tokens, interpret) -> [N, D]


GENERIC_MOVERS = RowMovers(_gather_rows, _combine_rows)


def _movers(variant: str) -> RowMovers:
    if kernel_variant(variant) == "tpu":
        from pallas_kernels import moe_permute_tpu  # lazy: it imports this module

        return moe_permute_tpu.TPU_MOVERS
    return GENERIC_MOVERS


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
    bs, movers = block_sizes or BlockSizes(), _movers(variant)
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
    bs, movers = block_sizes or BlockSizes(), _movers(variant)
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
