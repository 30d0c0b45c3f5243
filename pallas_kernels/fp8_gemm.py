"""Block-scaled FP8 GEMM (DeepSeek-V3 section 3.3, the DeepGEMM contract) as a Pallas kernel.

    out[m, n] = sum_kb (A_q[m, kb] . B_q[kb, n]) * sA[m, kb] * sB[kb, n // 128]

A_q [M, K] and B_q [K, N] are E4M3 codes from `fp8.quantize_rows` (1x128 tiles) and
`fp8.quantize_blocks` (128x128 blocks). Each 128-wide K block is one dot with float32
accumulation, scaled by its two scales and added to a float32 accumulator, as V3 promotes
partial sums to FP32 on CUDA cores per K block. `fp8_gemm_reference` does the same math in
jnp; the two differ only in the float32 summation order inside a block's dot.

Design (never compiled or run on a device here: CI is CPU-only, interpret mode; the Triton
and Mosaic TPU lowerings are checked from CPU by tests/test_kernel_lowering.py):
- Grid (M / block_m, N / block_n); each program keeps full-K row/column panels and runs a
  `fori_loop` over K blocks with the accumulator as loop carry. That one form lowers on
  Triton (whose programs have no ordered grid axis to carry a scratch accumulator across)
  and on Mosaic TPU, and runs with `interpret=True` on CPU. The cost is a full-K panel per
  program in VMEM/shared memory: K=18432 with a 128-wide tile is 2.25 MiB of FP8 per operand.
- The dot's inputs: FP8 codes go straight to the dot on NVIDIA GPUs with compute capability
  >= 8.9 (Ada/Hopper FP8 tensor cores, Triton's fp8 `tt.dot`). Everywhere else (CPU interpret,
  TPU, older GPUs) they are upcast to bfloat16 first: every E4M3 value (3 mantissa bits,
  exponents 2^-9..2^8) is exact in bfloat16 and products of two codes are exact in float32,
  so the upcast changes nothing numerically.
- A's scale column for block kb is picked from the (block_m, Kb) panel with a one-hot sum
  rather than a dynamic 1-wide lane slice, which Mosaic restricts; B's scales are expanded to
  one per column (Kb, N) in the wrapper (N*K/128 floats), which frees block_n from 128.
- `b_scale_per_column=True` takes B's scales as [K/128, N], one per column per 128 rows
  (128x1 tiles): V3's Wgrad, dW = X^T dY, quantizes both operands along the token axis
  (the contraction), so dY's scales vary per column. The kernel consumes per-column scales
  anyway; only the wrapper's expansion and the shape check differ.
- Shapes: M, N, K need not be block multiples; the wrapper pads with zeros (zero codes add
  nothing whatever their scale) and slices the result back. The scale shapes are checked
  against K and N, so a scale tensor from a different block size fails loudly.
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Output tile (block_m x block_n) per program; block_k is the K granularity of the scales.

    On GPU (Triton) use powers of two >= 16; on TPU multiples of 32 (FP8 sublane tiling) x 128.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128

    def __post_init__(self):
        check_positive_fields(self)


def _default_block_sizes(m: int) -> BlockSizes:
    # Small M (decode, tests) should not pad to 128 rows; a power of two >= 32 suits both
    # Triton (power-of-two tiles) and TPU (32-row FP8 tiles).
    return BlockSizes(block_m=min(128, max(32, pl.next_power_of_2(m))))


def _check_operands(
    a_q, a_scale, b_q, b_scale, block_k: int, b_per_column: bool = False
) -> tuple[int, int, int]:
    for name, x in (("a_q", a_q), ("b_q", b_q)):
        if x.dtype != FP8_DTYPE:
            raise TypeError(f"{name} must be {jnp.dtype(FP8_DTYPE).name} codes, got {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    for name, s in (("a_scale", a_scale), ("b_scale", b_scale)):
        if s.dtype != jnp.float32:
            raise TypeError(f"{name} must be float32, got {s.dtype}")
    (m, k), (k_b, n) = a_q.shape, b_q.shape
    if k != k_b:
        raise ValueError(f"contracting dims differ: a_q is {a_q.shape}, b_q is {b_q.shape}")
    kb, nb = cdiv(k, block_k), cdiv(n, block_k)
    if a_scale.shape != (m, kb):
        raise ValueError(
            f"a_scale shape {a_scale.shape} does not fit a_q {a_q.shape}: expected {(m, kb)} "
            f"(one scale per row per {block_k} columns)"
        )
    if b_per_column and b_scale.shape != (kb, n):
        raise ValueError(
            f"b_scale shape {b_scale.shape} does not fit b_q {b_q.shape}: expected {(kb, n)} "
            f"(b_scale_per_column: one scale per column per {block_k} rows)"
        )
    if not b_per_column and b_scale.shape != (kb, nb):
        raise ValueError(
            f"b_scale shape {b_scale.shape} does not fit b_q {b_q.shape}: expected {(kb, nb)} "
            f"(one scale per {block_k}x{block_k} block)"
        )
    return m, k, n


def _feed_fp8_to_dot(interpret: bool) -> bool:
    if interpret:
        return False
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return device.platform == "gpu" and capability is not None and float(capability) >= 8.9


def _kernel(
    a_ref, sa_ref, b_ref, sb_ref, o_ref, *, num_k_blocks: int, block_k: int, upcast, b_index=()
):
    """One (block_m, block_n) output tile: loop over K blocks, scale each partial, add in f32.

    a_ref (bm, K) e4m3, sa_ref (bm, Kb') f32, b_ref (K, bn) e4m3, sb_ref (Kb', bn) f32 (B's
    scales per column), o_ref (bm, bn). Kb' >= num_k_blocks (padded to a power of two).
    b_index: leading indices into b_ref / sb_ref (the grouped GEMM's expert), applied in the
    same indexer as the K slice (Triton's lowering takes one indexer per load).
    """
    sa_all = sa_ref[...]
    block_ids = lax.broadcasted_iota(jnp.int32, sa_all.shape, 1)

    def body(kb, acc):
        start = pl.multiple_of(kb * block_k, block_k)
        a = a_ref[:, pl.ds(start, block_k)]
        b = b_ref[(*b_index, pl.ds(start, block_k), slice(None))]
        if upcast is not None:
            a, b = a.astype(upcast), b.astype(upcast)
        partial = jnp.dot(a, b, preferred_element_type=jnp.float32)
        sa = jnp.sum(jnp.where(block_ids == kb, sa_all, 0.0), axis=1, keepdims=True)
        sb = sb_ref[(*b_index, pl.ds(kb, 1), slice(None))]
        return acc + (partial * sa) * sb

    acc = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret", "b_scale_per_column")
)
def fp8_gemm(
    a_q: jax.Array,
    a_scale: jax.Array,
    b_q: jax.Array,
    b_scale: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    b_scale_per_column: bool = False,
) -> jax.Array:
    """A_q [M, K] e4m3 (scales [M, K/128]) @ B_q [K, N] e4m3 (scales [K/128, N/128]) -> [M, N].

    With b_scale_per_column, B's scales are [K/128, N] (128x1 tiles) instead.
    """
    bs = block_sizes or _default_block_sizes(a_q.shape[0])
    m, k, n = _check_operands(a_q, a_scale, b_q, b_scale, bs.block_k, b_scale_per_column)
    kb = cdiv(k, bs.block_k)
    kb_pad = pl.next_power_of_2(kb)  # Triton tiles (the full scale panel) are powers of two
    m_pad, n_pad, k_pad = round_up(m, bs.block_m), round_up(n, bs.block_n), kb * bs.block_k

    a = jnp.pad(a_q, ((0, m_pad - m), (0, k_pad - k)))
    b = jnp.pad(b_q, ((0, k_pad - k), (0, n_pad - n)))
    sa = jnp.pad(a_scale, ((0, m_pad - m), (0, kb_pad - kb)))
    sb_cols = b_scale if b_scale_per_column else jnp.repeat(b_scale, bs.block_k, axis=1)[:, :n]
    sb_cols = jnp.pad(sb_cols, ((0, kb_pad - kb), (0, n_pad - n)))

    kernel = functools.partial(
        _kernel,
        num_k_blocks=kb,
        block_k=bs.block_k,
        upcast=None if _feed_fp8_to_dot(interpret) else jnp.bfloat16,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
        grid=(m_pad // bs.block_m, n_pad // bs.block_n),
        in_specs=[
            pl.BlockSpec((bs.block_m, k_pad), lambda i, j: (i, 0)),
            pl.BlockSpec((bs.block_m, kb_pad), lambda i, j: (i, 0)),
            pl.BlockSpec((k_pad, bs.block_n), lambda i, j: (0, j)),
            pl.BlockSpec((kb_pad, bs.block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j: (i, j)),
        compiler_params=generic_compiler_params(),
        interpret=interpret,
    )(a, sa, b, sb_cols)
    return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_k", "b_scale_per_column"))
def fp8_gemm_reference(
    a_q: jax.Array,
    a_scale: jax.Array,
    b_q: jax.Array,
    b_scale: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
    block_k: int = 128,
    b_scale_per_column: bool = False,
) -> jax.Array:
    """The kernel's math in jnp: per K block, exact code products summed in f32, then scaled."""
    m, k, n = _check_operands(a_q, a_scale, b_q, b_scale, block_k, b_scale_per_column)
    kb = cdiv(k, block_k)
    k_pad = kb * block_k
    # bfloat16 holds every E4M3 value exactly, so this dot is exact per product on any backend.
    a_blocks = jnp.pad(a_q, ((0, 0), (0, k_pad - k))).astype(jnp.bfloat16)
    a_blocks = a_blocks.reshape(m, kb, block_k).transpose(1, 0, 2)  # [Kb, M, bk]
    b_blocks = jnp.pad(b_q, ((0, k_pad - k), (0, 0))).astype(jnp.bfloat16)
    b_blocks = b_blocks.reshape(kb, block_k, n)  # [Kb, bk, N]
    sb_cols = b_scale if b_scale_per_column else jnp.repeat(b_scale, block_k, axis=1)[:, :n]

    def step(acc, xs):
        a_MxB, b_BxN, sa_M, sb_N = xs
        partial = jnp.dot(a_MxB, b_BxN, preferred_element_type=jnp.float32)
        return acc + (partial * sa_M[:, None]) * sb_N[None, :], None

    acc, _ = lax.scan(
        step, jnp.zeros((m, n), jnp.float32), (a_blocks, b_blocks, a_scale.T, sb_cols)
    )
    return acc.astype(out_dtype)


def fp8_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    pow2_scale: bool = False,
    out_dtype=jnp.bfloat16,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    use_reference: bool = False,
) -> jax.Array:
    """x [..., K] @ w [K, N] in FP8: x per 1x128 tile, w per 128x128 block, f32 accumulation."""
    block = (block_sizes or BlockSizes()).block_k
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_matmul needs x [..., K] and w [K, N], got {x.shape} and {w.shape}")
    x_q, x_s = quantize_rows(x.reshape(-1, x.shape[-1]), block=block, pow2_scale=pow2_scale)
    w_q, w_s = quantize_blocks(w, block=block, pow2_scale=pow2_scale)
    if use_reference:
        out = fp8_gemm_reference(x_q, x_s, w_q, w_s, out_dtype=out_dtype, block_k=block)
    else:
        out = fp8_gemm(
            x_q, x_s, w_q, w_s, out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret
        )
    return out.reshape(*x.shape[:-1], w.shape[1])
