"""MoE permute / combine row movement, TPU (Mosaic) build: the source stays in HBM and rows
are fetched by DMA at scalar-prefetched indices.

    gather:   out[r] = src[idx[r]]                       (permute; combine's backward)
    combine:  out[n] = sum_k w[n, k] * rows[dest[n, k]]  (combine; permute's backward)

These are the two row movers of pallas_kernels/moe_permute.py (`TPU_MOVERS`); its `permute`
and `combine` run them with variant="tpu" (the default on a TPU backend), with the same
index computation (`sort_indices`), custom_vjp wiring and `BlockSizes`. Only interpreted
here (CPU CI, `interpret=True` or `pltpu.InterpretParams()`); never compiled by Mosaic or timed
on a TPU, so nothing here is a claim about TPU speed. The Mosaic lowering (not the compile)
is checked from CPU by tests/test_kernel_lowering.py.

Why a second build: moe_permute.py's kernels keep the whole source resident in the block,
which on GPU is a global-memory pointer but on TPU would be copied into VMEM whole.

- Gather: one program per block of block_rows output rows. The row indices are
  scalar-prefetched (SMEM); the source is a `memory_space=pl.ANY` (HBM) operand. The program
  starts one row DMA per output row (src.at[idx[r]] -> a VMEM scratch block, one DMA
  semaphore), waits for all of them, and copies the block to its output block, which the
  pipeline writes back. All of a block's DMAs are in flight together; nothing overlaps the
  next block's fetches with this block's (a double-buffered scratch would).
- Combine: one program per block of block_tokens tokens; K row DMAs per token into a
  (K, block_tokens, D) scratch, then the weighted sum over K in float32 on whole blocks. The
  weights come as an ordinary (block_tokens, K) float32 VMEM block.
- VMEM per program: the scratch plus the double-buffered output block, independent of the
  source's rows. SMEM: the prefetched indices, 4 bytes per row (N * K for combine), which
  bounds one call to a few hundred thousand rows (SMEM is reportedly 1 MiB up to v6e).
- Grid axis "parallel": programs share nothing. Rows are DMA'd one at a time, so a wide D
  amortizes the per-DMA cost; 1-row DMAs of packed (bf16) rows are untested on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._blocks import round_up
from pallas_kernels.moe_permute import RowMovers

Interpret = bool | pltpu.InterpretParams


def _interpret_params(interpret: Interpret):
    # interpret=True runs the generic interpreter, which also executes scalar prefetch and
    # DMAs; pltpu.InterpretParams() runs the TPU interpreter (NaN-filled uninitialized
    # memory, out-of-bounds DMAs raise), which the tests use as well.
    return interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret)


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel",))


# -- gather ---------------------------------------------------------------------------------


def _gather_dma_kernel(idx_ref, src_hbm, o_ref, buf, sem):
    """o[r] = src[idx[i * br + r]] for the block's br rows.

    idx_ref [R] int32 in SMEM (prefetched), src_hbm (S, D) in HBM, o_ref (br, D),
    buf (br, D) VMEM scratch, sem: one DMA semaphore.
    """
    br = o_ref.shape[0]
    base = pl.program_id(0) * br

    def copy(r):
        src = src_hbm.at[pl.ds(idx_ref[base + r], 1)]
        return pltpu.make_async_copy(src, buf.at[pl.ds(r, 1)], sem.at[0])

    def start(r, c):
        copy(r).start()
        return c

    def wait(r, c):
        copy(r).wait()
        return c

    lax.fori_loop(0, br, start, 0)
    lax.fori_loop(0, br, wait, 0)
    o_ref[...] = buf[...]


def gather_rows(src_SxD: jax.Array, idx_R: jax.Array, block_rows: int, interpret: Interpret):
    """src[idx] -> [R, D] with the gather kernel (indices must lie in [0, S))."""
    (s, d), r = src_SxD.shape, idx_R.shape[0]
    if s == 0 or r == 0:
        return jnp.zeros((r, d), src_SxD.dtype)
    r_pad = round_up(r, block_rows)
    idx = jnp.pad(idx_R.astype(jnp.int32), (0, r_pad - r))  # padding rows copy row 0
    out = pl.pallas_call(
        _gather_dma_kernel,
        out_shape=jax.ShapeDtypeStruct((r_pad, d), src_SxD.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(r_pad // block_rows,),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((block_rows, d), lambda i, idx: (i, 0)),
            scratch_shapes=[
                pltpu.VMEM((block_rows, d), src_SxD.dtype),
                pltpu.SemaphoreType.DMA((1,)),
            ],
        ),
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(idx, src_SxD)
    return out[:r]


# -- combine --------------------------------------------------------------------------------


def _combine_dma_kernel(dest_ref, w_ref, rows_hbm, o_ref, buf, sem, *, top_k: int):
    """o[t] = sum_k w[t, k] * rows[dest[t, k]] in float32 for the block's bt tokens.

    dest_ref [N_pad * K] int32 in SMEM (prefetched, token-major), w_ref (bt, K) float32,
    rows_hbm (M, D) in HBM, o_ref (bt, D), buf (K, bt, D) VMEM scratch, sem: one DMA semaphore.
    """
    bt = o_ref.shape[0]
    base = pl.program_id(0) * bt * top_k

    def copy(t, k):
        src = rows_hbm.at[pl.ds(dest_ref[base + t * top_k + k], 1)]
        return pltpu.make_async_copy(src, buf.at[k, pl.ds(t, 1)], sem.at[0])

    def start(t, c):
        for k in range(top_k):
            copy(t, k).start()
        return c

    def wait(t, c):
        for k in range(top_k):
            copy(t, k).wait()
        return c

    lax.fori_loop(0, bt, start, 0)
    lax.fori_loop(0, bt, wait, 0)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    for k in range(top_k):
        acc += w_ref[:, k : k + 1] * buf[k].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def combine_rows(
    rows_MxD: jax.Array, w_NxK: jax.Array, dest_NxK: jax.Array, block_tokens: int, interpret
):
    """sum_k w[n, k] * rows[dest[n, k]] -> [N, D] with the combine kernel."""
    (m, d), (n, k) = rows_MxD.shape, dest_NxK.shape
    if m == 0 or n == 0:
        return jnp.zeros((n, d), rows_MxD.dtype)
    n_pad = round_up(n, block_tokens)
    # padding tokens read row 0 with weight 0
    dest = jnp.pad(dest_NxK.astype(jnp.int32), ((0, n_pad - n), (0, 0))).reshape(-1)
    w = jnp.pad(w_NxK.astype(jnp.float32), ((0, n_pad - n), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_combine_dma_kernel, top_k=k),
        out_shape=jax.ShapeDtypeStruct((n_pad, d), rows_MxD.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(n_pad // block_tokens,),
            in_specs=[
                pl.BlockSpec((block_tokens, k), lambda i, dest: (i, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=pl.BlockSpec((block_tokens, d), lambda i, dest: (i, 0)),
            scratch_shapes=[
                pltpu.VMEM((k, block_tokens, d), rows_MxD.dtype),
                pltpu.SemaphoreType.DMA((1,)),
            ],
        ),
        compiler_params=_compiler_params(),
        interpret=_interpret_params(interpret),
    )(dest, w, rows_MxD)
    return out[:n]


TPU_MOVERS = RowMovers(gather_rows, combine_rows)
