"""DeepSeek-V3 fine-grained FP8 quantization (paper section 3.3), in pure jnp.

V3 quantizes every GEMM operand to E4M3 (3 mantissa bits, max 448) with one float32 scale
per small tile, so that one outlier only costs the precision of its own tile:

- activations and activation gradients: per 1x128 tile (each row, each 128 columns),
  `quantize_rows(x_MxK) -> (q_MxK, scales_MxKb)`;
- weights: per 128x128 block, `quantize_blocks(w_KxN) -> (q_KxN, scales_KbxNb)`.

The scale is `s = max(amax, 1e-4) / 448`, the tile's current absolute maximum mapped onto
E4M3's largest finite value; `pow2_scale=True` rounds it UP to a power of two, so that
scaling and unscaling are exact exponent shifts (and the largest element still fits).
The 1e-4 floor keeps all-zero (and near-zero) tiles finite: q = 0 and s = 1e-4/448.

Shapes that are not multiples of `block` are padded with zeros internally (zeros never raise
a tile's amax) and the codes are sliced back, so q always has x's shape and the last tile of a
row/column simply holds fewer than `block` values; the scales cover ceil(dim / block) tiles.
Non-finite inputs are not supported (an inf makes its tile's scale inf and its codes NaN).

Rounding error (round-to-nearest-even into E4M3, see tests/test_fp8_gemm.py): for a scaled
value v = x / s, |fp8(v) - v| <= 2^-4 |v| when |v| >= 2^-6 (normal range, 3 mantissa bits),
and <= 2^-10 below that (subnormal spacing 2^-9). Hence per element
|dequant(q) - x| <= 2^-4 |x| + 2^-10 s (plus float32 rounding of x / s and q * s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._blocks import cdiv

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
AMAX_FLOOR = 1e-4  # V3: s = max(amax, 1e-4) / 448


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int (V3 uses 128), got {block!r}")


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8_DTYPE:
        raise TypeError(
            f"{name} must be a float16/bfloat16/float32 array to quantize, got dtype {x.dtype}"
        )


def compute_scale(amax: jax.Array, pow2_scale: bool = False) -> jax.Array:
    """Per-tile scale max(amax, 1e-4) / 448 in float32, optionally rounded up to 2^e."""
    scale = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / FP8_MAX
    if pow2_scale:
        mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [.5, 1)
        scale = jnp.where(mantissa == 0.5, scale, jnp.ldexp(jnp.float32(1.0), exponent))
    return scale


def _to_fp8(v: jax.Array) -> jax.Array:
    # x / s can land a float32 ulp above 448; E4M3FN has no inf, so an overflow would be NaN.
    return jnp.clip(v, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


@functools.partial(jax.jit, static_argnames=("block", "pow2_scale"))
def quantize_rows(
    x: jax.Array, block: int = 128, pow2_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Per 1 x `block` tile of the last axis: x [..., K] -> (q [..., K] e4m3, s [..., Kb] f32)."""
    _check_block(block)
    _check_float("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis (rows x K), got shape {x.shape}")
    k = x.shape[-1]
    kb = cdiv(k, block)
    x = x.astype(jnp.float32)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, kb * block - k)]
    tiles = jnp.pad(x, pad).reshape(*x.shape[:-1], kb, block)
    scale = compute_scale(jnp.max(jnp.abs(tiles), axis=-1), pow2_scale)
    q = _to_fp8(tiles / scale[..., None]).reshape(*x.shape[:-1], kb * block)[..., :k]
    return q, scale


@functools.partial(jax.jit, static_argnames=("block", "pow2_scale"))
def quantize_blocks(
    w: jax.Array, block: int = 128, pow2_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Per `block` x `block` block: w [K, N] -> (q [K, N] e4m3, s [ceil(K/b), ceil(N/b)] f32)."""
    _check_block(block)
    _check_float("w", w)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D weight [K, N], got shape {w.shape}")
    k, n = w.shape
    kb, nb = cdiv(k, block), cdiv(n, block)
    w = jnp.pad(w.astype(jnp.float32), ((0, kb * block - k), (0, nb * block - n)))
    blocks = w.reshape(kb, block, nb, block)
    scale = compute_scale(jnp.max(jnp.abs(blocks), axis=(1, 3)), pow2_scale)
    q = _to_fp8(blocks / scale[:, None, :, None]).reshape(kb * block, nb * block)[:k, :n]
    return q, scale


def dequantize_rows(q: jax.Array, scale: jax.Array, block: int = 128) -> jax.Array:
    """Inverse of quantize_rows: q [..., K] e4m3, s [..., ceil(K/block)] -> float32 [..., K]."""
    _check_block(block)
    k = q.shape[-1]
    if scale.shape != (*q.shape[:-1], cdiv(k, block)):
        raise ValueError(
            f"scale shape {scale.shape} does not match q {q.shape} with block {block}: "
            f"expected {(*q.shape[:-1], cdiv(k, block))}"
        )
    s = jnp.repeat(scale.astype(jnp.float32), block, axis=-1)[..., :k]
    return q.astype(jnp.float32) * s


def dequantize_blocks(q: jax.Array, scale: jax.Array, block: int = 128) -> jax.Array:
    """Inverse of quantize_blocks: q [K, N] e4m3, s [ceil(K/block), ceil(N/block)] -> f32 [K, N]."""
    _check_block(block)
    k, n = q.shape
    if scale.shape != (cdiv(k, block), cdiv(n, block)):
        raise ValueError(
            f"scale shape {scale.shape} does not match q {q.shape} with block {block}: "
            f"expected {(cdiv(k, block), cdiv(n, block))}"
        )
    s = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), block, axis=0), block, axis=1)
    return q.astype(jnp.float32) * s[:k, :n]
