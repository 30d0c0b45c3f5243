"""An FP8 linear layer whose three GEMMs all run in E4M3 at DeepSeek-V3's granularity (3.3).

For y = x w with x [M, K] (M tokens), w [K, N]:

    Fprop  y  = Q_rows(x)    @ Q_blocks(w)     x per 1x128 tile, w per 128x128 block
    Dgrad  dx = Q_rows(dy)   @ Q_blocks(w^T)   dy per 1x128 tile (V3: 128x128 diverged)
    Wgrad  dw = Q_rows(x^T)  @ Q_cols(dy)      both per 128x1 tile: 128 tokens of one channel

Every GEMM accumulates in float32 with the scales applied per 128-wide K block (the
`fp8_gemm` contract); the Wgrad contracts over tokens, so its operands are quantized along
the token axis ("re-tiled 128x1") and dy's scales vary per column (`b_scale_per_column`).
Q_blocks(w^T) is exactly Q_blocks(w)^T (same blocks, same amax), so the forward's weight
codes are reused. The gradients come back in the input dtypes: an f32 master weight gets an
f32 gradient accumulated in f32.

Unlike V3, which caches x as its 1x128 FP8 codes and re-quantizes those into 128x1 tiles,
the Wgrad here quantizes the saved x itself (one rounding instead of two); the residual is
x in its own dtype, as for an ordinary linear layer.

`use_kernel=True` runs the Pallas kernel (`interpret=True` on CPU), else the jnp reference;
the two agree up to float32 summation order inside a 128-wide block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.fp8 import quantize_blocks, quantize_rows
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_reference

BLOCK = 128


def quantize_cols(
    x_MxN: jax.Array, block: int = BLOCK, pow2_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Per `block` x 1 tile (down each column): x [M, N] -> (q [M, N] e4m3, s [M/block, N])."""
    if x_MxN.ndim != 2:
        raise ValueError(f"quantize_cols takes a 2-D [M, N] array, got shape {x_MxN.shape}")
    q_NxM, s_NxMb = quantize_rows(x_MxN.T, block=block, pow2_scale=pow2_scale)
    return q_NxM.T, s_NxMb.T


def _gemm(a_q, a_s, b_q, b_s, *, use_kernel: bool, interpret: bool, b_per_column: bool = False):
    if use_kernel:
        return fp8_gemm(
            a_q,
            a_s,
            b_q,
            b_s,
            out_dtype=jnp.float32,
            interpret=interpret,
            b_scale_per_column=b_per_column,
        )
    return fp8_gemm_reference(
        a_q, a_s, b_q, b_s, out_dtype=jnp.float32, b_scale_per_column=b_per_column
    )


def fprop(
    x_MxK: jax.Array,
    w_q: jax.Array,
    w_s: jax.Array,
    *,
    use_kernel: bool = False,
    interpret: bool = False,
    pow2_scale: bool = False,
) -> jax.Array:
    """Q_rows(x) @ (w_q, w_s) -> f32 [M, N]; also the Dgrad with (dy, Q_blocks(w)^T)."""
    x_q, x_s = quantize_rows(x_MxK, pow2_scale=pow2_scale)
    return _gemm(x_q, x_s, w_q, w_s, use_kernel=use_kernel, interpret=interpret)


def wgrad(
    x_MxK: jax.Array,
    dy_MxN: jax.Array,
    *,
    use_kernel: bool = False,
    interpret: bool = False,
    pow2_scale: bool = False,
) -> jax.Array:
    """x^T dy in FP8 with both operands per 128 tokens x 1 channel -> f32 [K, N]."""
    xt_q, xt_s = quantize_rows(x_MxK.T, pow2_scale=pow2_scale)
    dy_q, dy_s = quantize_cols(dy_MxN, pow2_scale=pow2_scale)
    return _gemm(
        xt_q, xt_s, dy_q, dy_s, use_kernel=use_kernel, interpret=interpret, b_per_column=True
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fp8_linear_2d(x_MxK, w_KxN, use_kernel, interpret, pow2_scale, out_dtype):
    return _fp8_linear_fwd(x_MxK, w_KxN, use_kernel, interpret, pow2_scale, out_dtype)[0]


def _fp8_linear_fwd(x_MxK, w_KxN, use_kernel, interpret, pow2_scale, out_dtype):
    w_q, w_s = quantize_blocks(w_KxN, pow2_scale=pow2_scale)
    y = fprop(x_MxK, w_q, w_s, use_kernel=use_kernel, interpret=interpret, pow2_scale=pow2_scale)
    # w's dtype travels as a zero-size array (residuals must be arrays).
    return y.astype(out_dtype), (x_MxK, w_q, w_s, jnp.zeros((0,), w_KxN.dtype))


def _fp8_linear_bwd(use_kernel, interpret, pow2_scale, out_dtype, residuals, dy_MxN):
    x_MxK, w_q, w_s, w_dtype = residuals
    kw = dict(use_kernel=use_kernel, interpret=interpret, pow2_scale=pow2_scale)
    dx = fprop(dy_MxN, w_q.T, w_s.T, **kw)
    dw = wgrad(x_MxK, dy_MxN, **kw)
    return dx.astype(x_MxK.dtype), dw.astype(w_dtype.dtype)


_fp8_linear_2d.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def fp8_linear(
    x: jax.Array,
    w_KxN: jax.Array,
    *,
    use_kernel: bool,
    interpret: bool,
    pow2_scale: bool = False,
    out_dtype=None,
) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] (out_dtype, default x's) with FP8 Fprop/Dgrad/Wgrad."""
    if x.ndim < 1 or w_KxN.ndim != 2 or x.shape[-1] != w_KxN.shape[0]:
        raise ValueError(
            f"fp8_linear needs x [..., K] and w [K, N], got {x.shape} and {w_KxN.shape}"
        )
    for name, a in (("x", x), ("w", w_KxN)):
        if not jnp.issubdtype(a.dtype, jnp.floating) or jnp.dtype(a.dtype).itemsize < 2:
            raise TypeError(f"fp8_linear: {name} must be float16/bfloat16/float32, got {a.dtype}")
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    k, n = w_KxN.shape
    y = _fp8_linear_2d(x.reshape(-1, k), w_KxN, use_kernel, interpret, pow2_scale, out_dtype)
    return y.reshape(*x.shape[:-1], n)
