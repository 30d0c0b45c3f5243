"""V3 fine-grained FP8 quantization and the block-scaled FP8 GEMM kernel against its reference.

Error bounds used below (E4M3: 3 mantissa bits, normal for |v| >= 2^-6, subnormal spacing
2^-9, round to nearest even). For a value x in a tile with scale s and v = x / s (|v| <= 448):
  quantization  |fp8(v) - v| <= 2^-4 |v|  (normal)  or  <= 2^-10  (subnormal, |v| < 2^-6),
  so            |x_hat - x| <= E(x) := (2^-4 + 2^-20) |x| + 2^-10 s,
where 2^-20 |x| absorbs the float32 roundings of x / s and q * s. The 1e-4 amax floor only
makes s larger than amax / 448 for tiles with amax < 1e-4: their values then sit lower in
E4M3's range, some in the subnormal range, which the 2^-10 s term covers (all-zero tiles are
exact). For the GEMM, as a_hat b_hat - a b = a (b_hat - b) + (a_hat - a) b + (a_hat - a)(b_hat - b),
  |C_fp8 - A B| <= sum_k |a| E(b) + E(a) |b| + E(a) E(b)  +  (K + 3) 2^-24 sum_k |a_hat| |b_hat|,
the last term bounding the float32 accumulation (products of two E4M3 codes are exact in f32;
at most 128 + Kb additions and 2 scale multiplications per term). Without subnormals this is
the familiar (2 * 2^-4 + 2^-8) sum_k |a| |b|. Kernel vs reference differ only in the order of
the f32 sum inside a block's dot: |C_kernel - C_ref| <= 2 (128 + 3) 2^-24 sum_k |a_hat| |b_hat|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pallas_kernels.fp8 import (
    AMAX_FLOOR,
    FP8_MAX,
    dequantize_blocks,
    dequantize_rows,
    quantize_blocks,
    quantize_rows,
)
from pallas_kernels.fp8_gemm import BlockSizes, fp8_gemm, fp8_gemm_reference, fp8_matmul

BLOCK = 128
FLOOR_SCALE = np.float32(AMAX_FLOOR) / np.float32(FP8_MAX)  # as computed in float32


def _data(seed: int, shape, magnitude: float = 1.0, spread: float = 0.0) -> np.ndarray:
    """Gaussian values; `spread` > 0 scales each row by 10^U(-spread, spread)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if spread:
        x *= 10.0 ** rng.uniform(-spread, spread, size=(*shape[:-1], 1))
    return (magnitude * x).astype(np.float32)


def _row_scales_per_element(scale, k):
    return np.repeat(np.asarray(scale, np.float64), BLOCK, axis=-1)[..., :k]


def _block_scales_per_element(scale, k, n):
    s = np.repeat(np.repeat(np.asarray(scale, np.float64), BLOCK, axis=0), BLOCK, axis=1)
    return s[:k, :n]


def _quant_error_bound(x, s_per_element):
    return (2.0**-4 + 2.0**-20) * np.abs(np.float64(x)) + 2.0**-10 * s_per_element


class TestFp8Gemm:
    INTERPRET = jax.default_backend() == "cpu"

    def gemm(self, a_q, a_s, b_q, b_s, **kw):
        return fp8_gemm(a_q, a_s, b_q, b_s, interpret=self.INTERPRET, **kw)

    # -- quantization --------------------------------------------------------------------

    @pytest.mark.parametrize("pow2_scale", [False, True])
    @pytest.mark.parametrize("k", [5, 128, 129, 300])
    def test_rows_round_trip_within_e4m3_bound(self, k, pow2_scale):
        x = _data(0, (9, k), spread=7.0)  # rows from 1e-7 to 1e7
        x[0] *= 1e-9 / np.abs(x[0]).max()  # below the floor, subnormal codes
        x[1] *= 3e-5 / np.abs(x[1]).max()  # below the floor, normal codes
        q, s = quantize_rows(jnp.asarray(x), pow2_scale=pow2_scale)
        assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
        assert s.dtype == jnp.float32 and s.shape == (9, -(-k // BLOCK))
        err = np.abs(np.asarray(dequantize_rows(q, s), np.float64) - x)
        assert np.all(err <= _quant_error_bound(x, _row_scales_per_element(s, k)))
        # each tile's amax lands on E4M3's largest value unless the floor or pow2 lowered it
        tiles_amax = np.abs(np.pad(x, ((0, 0), (0, -k % BLOCK)))).reshape(9, -1, BLOCK).max(-1)
        q_amax = np.abs(np.pad(np.float32(q), ((0, 0), (0, -k % BLOCK)))).reshape(9, -1, BLOCK)
        q_amax = q_amax.max(-1)
        # (pow2: amax / s lies in (224, 448], which E4M3 rounds into [224, 448])
        assert np.all(q_amax[tiles_amax >= AMAX_FLOOR] >= (FP8_MAX if not pow2_scale else 224))
        if not pow2_scale:
            assert np.all(np.asarray(s)[tiles_amax < AMAX_FLOOR] == FLOOR_SCALE)

    @pytest.mark.parametrize("pow2_scale", [False, True])
    @pytest.mark.parametrize(("k", "n"), [(128, 256), (129, 5), (300, 131)])
    def test_blocks_round_trip_within_e4m3_bound(self, k, n, pow2_scale):
        w = _data(1, (k, n), spread=3.0)
        q, s = quantize_blocks(jnp.asarray(w), pow2_scale=pow2_scale)
        assert q.shape == (k, n) and s.shape == (-(-k // BLOCK), -(-n // BLOCK))
        err = np.abs(np.asarray(dequantize_blocks(q, s), np.float64) - w)
        assert np.all(err <= _quant_error_bound(w, _block_scales_per_element(s, k, n)))

    def test_pow2_scales_are_powers_of_two_rounded_up(self):
        x = jnp.asarray(_data(2, (16, 384), spread=8.0))
        _, exact = quantize_rows(x)
        _, pow2 = quantize_rows(x, pow2_scale=True)
        mantissa, _ = np.frexp(np.asarray(pow2))
        assert np.all(mantissa == 0.5)
        assert np.all(pow2 >= exact) and np.all(pow2 < 2 * exact)

    def test_padding_equals_explicit_zero_padding(self):
        # the internal zero padding must act exactly as if the caller had padded K to 256
        x = _data(3, (7, 129))
        q, s = quantize_rows(jnp.asarray(x))
        q_pad, s_pad = quantize_rows(jnp.asarray(np.pad(x, ((0, 0), (0, 127)))))
        np.testing.assert_array_equal(np.float32(q), np.float32(q_pad)[:, :129])
        np.testing.assert_array_equal(s, s_pad)
        w = _data(4, (129, 5))
        bq, bs = quantize_blocks(jnp.asarray(w))
        bq_pad, bs_pad = quantize_blocks(jnp.asarray(np.pad(w, ((0, 127), (0, 123)))))
        np.testing.assert_array_equal(np.float32(bq), np.float32(bq_pad)[:129, :5])
        np.testing.assert_array_equal(bs, bs_pad)
        out = self.gemm(q, s, bq, bs, out_dtype=jnp.float32)
        out_pad = self.gemm(q_pad, s_pad, bq_pad, bs_pad, out_dtype=jnp.float32)[:, :5]
        np.testing.assert_array_equal(out, out_pad)

    # -- GEMM ------------------------------------------------------------------------------

    def check_gemm(self, a, b, block_sizes=None, pow2_scale=False):
        """Kernel == reference up to f32 order, and both within the derived bound of A @ B."""
        (m, k), n = a.shape, b.shape[1]
        a_q, a_s = quantize_rows(jnp.asarray(a), pow2_scale=pow2_scale)
        b_q, b_s = quantize_blocks(jnp.asarray(b), pow2_scale=pow2_scale)
        out = self.gemm(a_q, a_s, b_q, b_s, out_dtype=jnp.float32, block_sizes=block_sizes)
        ref = fp8_gemm_reference(a_q, a_s, b_q, b_s, out_dtype=jnp.float32)
        assert out.shape == ref.shape == (m, n) and out.dtype == jnp.float32
        out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)

        a_hat = np.abs(np.asarray(dequantize_rows(a_q, a_s), np.float64))
        b_hat = np.abs(np.asarray(dequantize_blocks(b_q, b_s), np.float64))
        abs_hat = a_hat @ b_hat
        order_bound = 2 * (BLOCK + 3) * 2.0**-24 * abs_hat
        assert np.all(np.abs(out - ref) <= order_bound), "kernel differs from reference"

        a64, b64 = np.float64(a), np.float64(b)
        e_a = _quant_error_bound(a, _row_scales_per_element(a_s, k))
        e_b = _quant_error_bound(b, _block_scales_per_element(b_s, k, n))
        bound = np.abs(a64) @ e_b + e_a @ np.abs(b64) + e_a @ e_b
        bound += (-(-k // BLOCK) * BLOCK + 3) * 2.0**-24 * abs_hat
        err = np.abs(out - a64 @ b64)
        assert np.all(err <= bound), f"max err/bound {np.max(err / np.maximum(bound, 1e-300))}"
        return out

    @pytest.mark.parametrize(
        ("shape", "block_sizes"),
        [
            ((128, 256, 128), None),
            ((64, 384, 256), BlockSizes(block_m=32, block_n=64)),
            ((40, 256, 200), BlockSizes(block_m=32, block_n=256)),
        ],
    )
    def test_gemm_matches_reference_and_f32_bound(self, shape, block_sizes):
        m, k, n = shape
        self.check_gemm(_data(5, (m, k), spread=1.0), _data(6, (k, n)), block_sizes)

    def test_gemm_pow2_scales(self):
        self.check_gemm(_data(7, (33, 200), spread=2.0), _data(8, (200, 70)), pow2_scale=True)

    @settings(max_examples=8, deadline=None)
    @given(
        m=st.integers(1, 300),
        k=st.integers(1, 300),
        n=st.integers(1, 300),
        block_sizes=st.sampled_from([None, BlockSizes(32, 64), BlockSizes(64, 256)]),
        seed=st.integers(0, 2**16),
    )
    @example(m=3, k=129, n=5, block_sizes=None, seed=0)
    @example(m=33, k=100, n=129, block_sizes=BlockSizes(32, 64), seed=1)
    @example(m=1, k=1, n=1, block_sizes=None, seed=2)
    def test_gemm_odd_shapes(self, m, k, n, block_sizes, seed):
        self.check_gemm(_data(seed, (m, k), spread=2.0), _data(seed + 1, (k, n)), block_sizes)

    def test_zeros(self):
        a_q, a_s = quantize_rows(jnp.zeros((8, 200)))
        b_q, b_s = quantize_blocks(jnp.zeros((200, 16)))
        np.testing.assert_array_equal(a_s, FLOOR_SCALE)  # finite, no 0/0
        out = self.gemm(a_q, a_s, b_q, b_s, out_dtype=jnp.float32)
        np.testing.assert_array_equal(out, 0.0)

    def test_all_equal(self):
        a, b = np.full((8, 300), 3.7, np.float32), np.full((300, 16), -1.3, np.float32)
        out = self.check_gemm(a, b)
        np.testing.assert_allclose(out, 300 * 3.7 * -1.3, rtol=1e-5)

    @pytest.mark.parametrize("magnitude", [1e-12, 1e15])
    def test_extreme_magnitudes(self, magnitude):
        # 1e-12: every tile is below the 1e-4 floor (subnormal codes); 1e15: products ~1e30
        out = self.check_gemm(_data(9, (16, 160), magnitude), _data(10, (160, 24), magnitude))
        assert np.all(np.isfinite(out))

    def test_bf16_output_is_rounded_f32_output(self):
        a_q, a_s = quantize_rows(jnp.asarray(_data(11, (32, 256))))
        b_q, b_s = quantize_blocks(jnp.asarray(_data(12, (256, 64))))
        f32 = self.gemm(a_q, a_s, b_q, b_s, out_dtype=jnp.float32)
        bf16 = self.gemm(a_q, a_s, b_q, b_s)
        assert bf16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(bf16, f32.astype(jnp.bfloat16))

    def test_fp8_matmul_leading_dims_and_reference_switch(self):
        x, w = jnp.asarray(_data(13, (2, 3, 130))), jnp.asarray(_data(14, (130, 20)))
        kw = dict(out_dtype=jnp.float32)
        out = fp8_matmul(x, w, interpret=self.INTERPRET, **kw)
        ref = fp8_matmul(x, w, use_reference=True, **kw)
        assert out.shape == (2, 3, 20)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))

    # -- errors ----------------------------------------------------------------------------

    def test_clear_errors(self):
        a_q, a_s = quantize_rows(jnp.ones((4, 200)))
        b_q, b_s = quantize_blocks(jnp.ones((200, 8)))
        with pytest.raises(TypeError, match="a_q must be float8_e4m3fn"):
            self.gemm(a_q.astype(jnp.float32), a_s, b_q, b_s)
        with pytest.raises(TypeError, match="b_scale must be float32"):
            self.gemm(a_q, a_s, b_q, b_s.astype(jnp.bfloat16))
        with pytest.raises(ValueError, match=r"a_scale shape \(4, 1\).*expected \(4, 2\)"):
            self.gemm(a_q, a_s[:, :1], b_q, b_s)
        with pytest.raises(ValueError, match="b_scale shape"):
            self.gemm(a_q, a_s, b_q, jnp.ones((2, 2), jnp.float32))
        with pytest.raises(ValueError, match="contracting dims differ"):
            self.gemm(a_q, a_s, b_q[:199], b_s)
        with pytest.raises(ValueError, match="a_q must be 2-D"):
            self.gemm(a_q[None], a_s, b_q, b_s)
        with pytest.raises(ValueError, match=r"BlockSizes\.block_m must be a positive int"):
            BlockSizes(block_m=0)
        with pytest.raises(ValueError, match="w must be a 2-D weight"):
            quantize_blocks(jnp.ones((3, 4, 5)))
        with pytest.raises(TypeError, match="x must be a float16/bfloat16/float32"):
            quantize_rows(jnp.ones((3, 4), jnp.int32))
        with pytest.raises(ValueError, match="block must be a positive int"):
            quantize_rows(jnp.ones((3, 4)), block=0)
        with pytest.raises(ValueError, match="fp8_matmul needs"):
            fp8_matmul(jnp.ones((3, 4)), jnp.ones((5, 6)))
