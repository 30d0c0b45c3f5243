"""Grouped GEMM over expert-sorted rows, TPU (Mosaic) build: the expert is chosen by a
scalar-prefetched index_map instead of inside the kernel.

    out[m] = rows[m] @ weights[e(m)],   e(m) = the expert whose contiguous group holds row m

Same operands, math, tile-padded rows (`sort_by_expert.tile_sorted_rows`), `BlockSizes` and
custom VJP (`custom_vjp_gemm`) as pallas_kernels/grouped_gemm.py, whose public `grouped_gemm`
runs this file's `grouped_gemm_tpu` with variant="tpu" (the default on a TPU backend). Only
interpreted here (CPU CI, `interpret=True` or `pltpu.InterpretParams()`); never compiled by
Mosaic or timed on a TPU, so nothing here is a claim about TPU speed. The Mosaic lowering
(not the compile) is checked from CPU at V3 and odd shapes by tests/test_kernel_lowering.py.

Why a second build: grouped_gemm.py's kernels keep the weights' E and K axes (and, for dW,
all buffer rows) resident in one block, which on GPU is a global-memory pointer but on TPU
would be copied into VMEM whole. Here every block is a (block, block) panel:

- Forward, `_gmm_kernel`: grid (tiles, N / block_n, K / block_k), K last. The tile -> expert
  map and the used-tile count are scalar-prefetched (`pltpu.PrefetchScalarGridSpec`, SMEM),
  and the weights' BlockSpec picks the expert: block (None, block_k, block_n) at
  (tile_expert[i], k, j). A float32 VMEM scratch accumulates over K (zeroed at k == 0,
  written out at the last k). dimension_semantics (parallel, parallel, arbitrary): the K axis
  carries the accumulator. Tiles past the used ones skip the dot and write zeros; their
  index_maps return the last used step's block indices, and the TPU pipeline skips a copy
  whose block indices equal the previous step's, so they move no input data.
- dX is the same kernel with `transpose_rhs`: the weight block is (None, block_n, block_k) at
  (tile_expert[i], j, k), contracted on its last axis, so w^T is never materialized.
- dW[e] = X_e^T dY_e, `_tgmm_kernel`: grid (K / block_k, N / block_n, visits), visits last
  ("arbitrary"). A visit is one row tile of one expert, in buffer order (the megablox idea of
  walking the tiles in order; our tiles hold one expert each, so no tile is visited twice and
  no rows are masked). The visit -> (tile, expert, flags) plan is jnp outside the kernel and
  scalar-prefetched; the output block is (None, block_k, block_n) at (expert[v], k, n), so it
  stays resident while one expert's visits accumulate into the float32 scratch (zeroed on the
  expert's first visit, written on its last) and is written back once when the expert changes.
  An empty expert gets one visit without rows, which writes its zero block (otherwise its dW
  block would never be written). The plan has a static length cdiv(M, block_m) + E (>= used
  tiles + empty experts); visits past the real ones repeat the last one's block indices (no
  DMA, same output block) and do nothing. Rejected alternative: grid (E, K/bk, N/bn,
  max tiles per expert) with clamped/masked row tiles, whose static max is cdiv(M, block_m)
  for every expert, i.e. E times the steps (most of them empty) of walking the tiles once.
- VMEM per step (double-buffered inputs/outputs): about 2 * (bm*bk + bk*bn + bm*bn) elements
  plus the bm*bn (forward) or bk*bn (dW) float32 accumulator, independent of E, K, N and M.
  SMEM: the prefetched maps, 4 bytes per tile / visit.
- Shapes: K and N are zero-padded to block multiples outside the kernel (a no-op for aligned
  model shapes). Mosaic wants the last two dims of every block divisible by 8 and 128 (or
  equal to the array's), so on a real TPU block_k and block_n should be multiples of 128 and
  block_m of 8 (or more for packed dtypes); the default BlockSizes are the generic build's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._blocks import cdiv, round_up
from pallas_kernels.grouped_gemm import (
    BlockSizes,
    GemmKernels,
    custom_vjp_gemm,
)
from pallas_kernels.sort_by_expert import TiledRows

Interpret = bool | pltpu.InterpretParams

# dW visit flags
FIRST, LAST, LIVE = 1, 2, 4


def _interpret_params(interpret: Interpret):
    # interpret=True runs the generic interpreter, which also executes scalar prefetch and
    # DMAs; pltpu.InterpretParams() runs the TPU interpreter (NaN-filled uninitialized
    # memory, out-of-bounds reads raise), which the tests use as well.
    return interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret)


# -- forward / dX ---------------------------------------------------------------------------


def _gmm_kernel(te_ref, used_ref, x_ref, w_ref, o_ref, acc_ref, *, transpose_rhs: bool):
    """One (bm, bn) output tile, accumulated over the K grid axis in float32.

    te_ref [T] / used_ref [1] int32 in SMEM (prefetched), x_ref (bm, bk), w_ref (bk, bn) or
    (bn, bk) with transpose_rhs (the tile's expert, picked by the index_map), o_ref (bm, bn),
    acc_ref (bm, bn) float32 scratch.
    """
    del te_ref
    i, k = pl.program_id(0), pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(i < used_ref[0])
    def _():
        contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
        acc_ref[...] += lax.dot_general(
            x_ref[...], w_ref[...], (contract, ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)  # zeros for an unused tile


def _live_step(i, j, k, used_ref, num_j: int, num_k: int):
    """(i, j, k), or for a tile past the used ones the last used step (i.e. the blocks that
    are already in VMEM; with no used tile, tile 0's last step)."""
    live = i < used_ref[0]
    last = jnp.maximum(used_ref[0] - 1, 0)
    return (
        jnp.where(live, i, last),
        jnp.where(live, j, num_j - 1),
        jnp.where(live, k, num_k - 1),
    )


def _gmm_call(
    x_PxK, w, layout: TiledRows, bs: BlockSizes, out_dtype, interpret, transpose_rhs=False
):
    """Tile-padded buffer [P, K] x w [E, K, N] (or [E, N, K] with transpose_rhs) -> [P, N]."""
    p, k = x_PxK.shape
    n = w.shape[1] if transpose_rhs else w.shape[2]
    k_pad, n_pad = round_up(k, bs.block_k), round_up(n, bs.block_n)
    num_t, num_j, num_k = p // bs.block_m, n_pad // bs.block_n, k_pad // bs.block_k
    x = jnp.pad(x_PxK, ((0, 0), (0, k_pad - k)))
    if transpose_rhs:
        w = jnp.pad(w, ((0, 0), (0, n_pad - n), (0, k_pad - k)))
        w_block = (None, bs.block_n, bs.block_k)
    else:
        w = jnp.pad(w, ((0, 0), (0, k_pad - k), (0, n_pad - n)))
        w_block = (None, bs.block_k, bs.block_n)

    def x_map(i, j, kk, te_ref, used_ref):
        ii, _, kk = _live_step(i, j, kk, used_ref, num_j, num_k)
        return ii, kk

    def w_map(i, j, kk, te_ref, used_ref):
        ii, jj, kk = _live_step(i, j, kk, used_ref, num_j, num_k)
        return (te_ref[ii], jj, kk) if transpose_rhs else (te_ref[ii], kk, jj)

    out = pl.pallas_call(
        functools.partial(_gmm_kernel, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((p, n_pad), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_t, num_j, num_k),
            in_specs=[
                pl.BlockSpec((bs.block_m, bs.block_k), x_map),
                pl.BlockSpec(w_block, w_map),
            ],
            out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j, kk, te, used: (i, j)),
            scratch_shapes=[pltpu.VMEM((bs.block_m, bs.block_n), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_params(interpret),
    )(layout.tile_expert, layout.used_tiles, x, w)
    return out[:, :n]


# -- dW -------------------------------------------------------------------------------------


@struct.dataclass
class VisitPlan:
    """The dW kernel's walk over row tiles: one visit per tile of each expert, in buffer
    order, and one visit without rows per empty expert."""

    tile: jax.Array  # [V] row tile read at visit v (the previous one's when it has no rows)
    expert: jax.Array  # [V] expert whose dW block visit v accumulates into
    flags: jax.Array  # [V] FIRST (zero the accumulator) | LAST (write it) | LIVE (has rows)


def visit_plan(layout: TiledRows, num_visits: int) -> VisitPlan:
    """Visits in expert order; `num_visits` is a static bound >= used tiles + empty experts."""
    count_E = layout.tile_count_E
    e = count_E.shape[0]
    visits_E = jnp.maximum(count_E, 1)
    end_E = jnp.cumsum(visits_E)
    v = jnp.arange(num_visits, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(end_E, v, side="right"), e - 1).astype(jnp.int32)
    rank = v - (end_E - visits_E)[expert]
    real = v < end_E[-1]  # visits past the real ones: expert E - 1 again, rank out of range
    live = rank < count_E[expert]
    # Live tiles increase with v, so the running max is the latest live tile: a visit without
    # rows keeps the previous visit's tile (no DMA), and all indices stay in the buffer.
    tile = lax.cummax(jnp.where(live, layout.tile_start_E[expert] + rank, 0), axis=0)
    flags = (
        jnp.where(real & (rank == 0), FIRST, 0)
        | jnp.where(real & (rank == visits_E[expert] - 1), LAST, 0)
        | jnp.where(live, LIVE, 0)
    )
    return VisitPlan(tile.astype(jnp.int32), expert, flags.astype(jnp.int32))


def _tgmm_kernel(tile_ref, expert_ref, flags_ref, x_ref, dy_ref, o_ref, acc_ref):
    """Visit v of one (bk, bn) dW block: acc (+)= x_tile^T dy_tile for the visit's expert.

    tile_ref / expert_ref / flags_ref [V] int32 in SMEM (prefetched), x_ref (bm, bk),
    dy_ref (bm, bn), o_ref (bk, bn) of expert[v], acc_ref (bk, bn) float32 scratch.
    """
    del tile_ref, expert_ref
    flags = flags_ref[pl.program_id(2)]

    @pl.when((flags & FIRST) != 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((flags & LIVE) != 0)
    def _():
        acc_ref[...] += lax.dot_general(
            x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when((flags & LAST) != 0)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tgmm_call(x_PxK, dy_PxN, layout: TiledRows, bs: BlockSizes, interpret):
    """Per-expert X^T dY over the tile-padded buffers -> [E, K, N] float32."""
    k, n = x_PxK.shape[1], dy_PxN.shape[1]
    e = layout.tile_count_E.shape[0]
    k_pad, n_pad = round_up(k, bs.block_k), round_up(n, bs.block_n)
    x = jnp.pad(x_PxK, ((0, 0), (0, k_pad - k)))
    dy = jnp.pad(dy_PxN, ((0, 0), (0, n_pad - n)))
    # used tiles <= cdiv(M, bm) + non-empty experts (each wastes < 1 tile), so visits <= this
    num_visits = cdiv(layout.dest_M.shape[0], bs.block_m) + e
    plan = visit_plan(layout, num_visits)
    out = pl.pallas_call(
        _tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((e, k_pad, n_pad), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(k_pad // bs.block_k, n_pad // bs.block_n, num_visits),
            in_specs=[
                pl.BlockSpec((bs.block_m, bs.block_k), lambda i, j, v, t, ex, f: (t[v], i)),
                pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j, v, t, ex, f: (t[v], j)),
            ],
            out_specs=pl.BlockSpec(
                (None, bs.block_k, bs.block_n), lambda i, j, v, t, ex, f: (ex[v], i, j)
            ),
            scratch_shapes=[pltpu.VMEM((bs.block_k, bs.block_n), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_params(interpret),
    )(plan.tile, plan.expert, plan.flags, x, dy)
    return out[:, :k, :n]


# -- custom_vjp wiring: grouped_gemm.py's, on this file's kernels ------------------------------

# (rows, weights, group_sizes, bs, out_dtype, interpret) -> [M, N]; grouped_gemm(variant="tpu")
grouped_gemm_tpu = custom_vjp_gemm(
    GemmKernels(_gmm_call, functools.partial(_gmm_call, transpose_rhs=True), _tgmm_call),
    "_grouped_gemm_tpu",
)
