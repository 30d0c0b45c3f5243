"""The FP8 grouped GEMM kernel (Fprop, Dgrad, Wgrad in E4M3) against its jnp reference, the
tiled-scan FP8 grouped matmul (model/fp8_grouped.py) and the unquantized grouped GEMM.

Bounds (tests/test_fp8_gemm.py derives them). Per element x in a tile with scale s, E4M3
rounding gives |x_hat - x| <= E(x) := (2^-4 + 2^-20) |x| + 2^-10 s (normal values lose at
most 2^-4 relatively, subnormal codes at most 2^-10 s absolutely). Each of the three GEMMs is
C = A B over a contraction of length L (K for Fprop, N for Dgrad, the expert's rows for
Wgrad), and a_hat b_hat - a b = (|a| + E(a))(|b| + E(b)) - |a||b| at worst, so

    |C_fp8 - A B| <= (|A| + E_A)(|B| + E_B) - |A||B|  +  (L' + 3) 2^-24 (|A| + E_A)(|B| + E_B)

elementwise, where the last term bounds the float32 accumulation (code products are exact in
f32; each term sees at most L' + 3 roundings, L' the contraction padded to its 128-block or
tile) and |A_hat| <= |A| + E_A. Without subnormal codes the first part is the familiar
(2 * 2^-4 + 2^-8) sum_k |a||b|. Kernel and reference compute the same codes and scales and
differ only in the order of the f32 sums, so they agree within twice the accumulation term:
|C_kernel - C_ref| <= 2 (L' + 3) 2^-24 (|A| + E_A)(|B| + E_B), which is ~2^-16 relative; a
wrong scale (another expert's, another K block's, another tile's) changes terms by the ratio
of two scales, orders of magnitude more, and the data below gives every row, 128-column
block and expert its own magnitude so that no two scales coincide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from model.fp8_grouped import fp8_tiled_scan
from pallas_kernels.fp8 import quantize_rows
from pallas_kernels.fp8_grouped_gemm import (
    BlockSizes,
    fp8_grouped_gemm,
    fp8_grouped_gemm_fprop,
    fp8_grouped_gemm_fprop_reference,
    fp8_grouped_gemm_reference,
    quantize_weights,
)
from pallas_kernels.grouped_gemm import _from_buffer, _to_buffer
from pallas_kernels.sort_by_expert import tile_sorted_rows

QB = 128
ULP = 2.0**-24


def _data(seed, m, k, n, e):
    """Rows with per-row and per-column-block magnitudes, per-expert weight magnitudes, and a
    cotangent with per-row magnitudes (10^U(-1, 1) each)."""
    rng = np.random.default_rng(seed)
    mag = lambda *shape: 10.0 ** rng.uniform(-1, 1, size=shape)
    col_blocks = np.repeat(mag(1, -(-k // QB)), QB, axis=1)[:, :k]
    x = rng.standard_normal((m, k)) * mag(m, 1) * col_blocks
    w = rng.standard_normal((e, k, n)) * mag(e, 1, 1) / np.sqrt(k)
    g = rng.standard_normal((m, n)) * mag(m, 1)
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, w, g))


def _vjp(fn, x, w, gs, g, **kw):
    y, pullback = jax.vjp(lambda x, w: fn(x, w, gs, **kw), x, w)
    return (y, *pullback(g))


def _err(x, amax):
    """E(x) elementwise, given the amax of each element's tile: the scale is at most
    2 max(amax, 1e-4) / 448 (pow2_scale rounds it up by less than 2x)."""
    return (2.0**-4 + 2.0**-20) * np.abs(x) + 2.0**-10 * 2 * np.maximum(amax, 1e-4) / 448


def _block_amax(a, axis):
    """Each element's amax over its 128-wide block along `axis` (numpy, float64)."""
    a = np.moveaxis(np.abs(a), axis, -1)
    size = a.shape[-1]
    pad = [(0, 0)] * (a.ndim - 1) + [(0, -size % QB)]
    blocks = np.pad(a, pad).reshape(*a.shape[:-1], -1, QB).max(-1, keepdims=True)
    amax = np.broadcast_to(blocks, (*a.shape[:-1], blocks.shape[-2], QB))
    return np.moveaxis(amax.reshape(*a.shape[:-1], -1)[..., :size], -1, axis)


def _tile_amax(a, rows):
    """Each element's amax over its tile of `rows` rows (one expert's rows, from its first)."""
    pad = np.pad(np.abs(a), ((0, -a.shape[0] % rows), (0, 0)))
    amax = pad.reshape(-1, rows, a.shape[1]).max(1)
    return np.repeat(amax, rows, axis=0)[: a.shape[0]]


def _bounds(x, w, g, sizes, block_m):
    """Per element of (y, dx, dw): the bound on |fp8 - exact| and on |kernel - reference|."""
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    (m, k), (e, _, n) = x.shape, w.shape
    ex, eg = _err(x64, _block_amax(x64, 1)), _err(g64, _block_amax(g64, 1))
    ew = _err(w64, _block_amax(_block_amax(w64, 1), 2))

    def gemm(a, ea, b, eb, length):
        hat = (np.abs(a) + ea) @ (np.abs(b) + eb)
        to_exact = hat - np.abs(a) @ np.abs(b) + (length + 3) * ULP * hat
        return to_exact, 2 * (length + 3) * ULP * hat

    y, dx = np.zeros((m, n)), np.zeros((m, k))
    dw = np.zeros((e, k, n))
    y_ord, dx_ord, dw_ord = y.copy(), dx.copy(), dw.copy()
    ends = np.cumsum(sizes)
    rows = min(block_m, QB)
    for i in range(e):
        r = slice(ends[i] - sizes[i], ends[i])
        y[r], y_ord[r] = gemm(x64[r], ex[r], w64[i], ew[i], -(-k // QB) * QB)
        dx[r], dx_ord[r] = gemm(g64[r], eg[r], w64[i].T, ew[i].T, -(-n // QB) * QB)
        # Wgrad: scales per `rows` tokens of the expert (its tiles) and channel.
        ex_t, eg_t = _err(x64[r], _tile_amax(x64[r], rows)), _err(g64[r], _tile_amax(g64[r], rows))
        padded = -(-sizes[i] // block_m) * block_m
        dw[i], dw_ord[i] = gemm(x64[r].T, ex_t.T, g64[r], eg_t, padded)
    return (y, dx, dw), (y_ord, dx_ord, dw_ord)


def _exact(x, w, g, gs):
    """The unquantized grouped GEMM (lax.ragged_dot in f32) and its gradients, in float64."""
    f = lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST)
    return [np.asarray(a, np.float64) for a in _vjp(f, x, w, gs, g)]


class TestFp8GroupedGemm:
    INTERPRET = True

    def gemm(self, x, w, gs, g, **kw):
        return _vjp(fp8_grouped_gemm, x, w, gs, g, interpret=self.INTERPRET, **kw)

    def check(self, seed, m, k, n, sizes, block_sizes, pow2_scale=False):
        """Kernel == reference (values, dX, dW) up to f32 order, both within the bound of
        the exact grouped GEMM; rows past sum(sizes) and empty experts get zeros."""
        x, w, g = _data(seed, m, k, n, len(sizes))
        gs = jnp.asarray(sizes, jnp.int32)
        kw = dict(block_sizes=block_sizes, pow2_scale=pow2_scale)
        out = self.gemm(x, w, gs, g, **kw)
        ref = _vjp(fp8_grouped_gemm_reference, x, w, gs, g, **kw)
        exact = _exact(x, w, g, gs)
        to_exact, order = _bounds(x, w, g, np.asarray(sizes), (block_sizes or BlockSizes()).block_m)
        stats = {}
        for name, o, r, t, b_t, b_o in zip(
            ("y", "dx", "dw"), out, ref, exact, to_exact, order, strict=True
        ):
            assert o.shape == r.shape == t.shape and o.dtype == jnp.float32, name
            o, r = np.asarray(o, np.float64), np.asarray(r, np.float64)
            assert np.all(np.abs(o - r) <= b_o), f"{name}: kernel differs from the reference"
            err = np.abs(o - t)
            ratio = np.max(err / np.maximum(b_t, 1e-300))
            assert np.all(err <= b_t), f"{name}: max |fp8 - exact| / bound = {ratio:.3f}"
            scale = max(np.abs(t).max(), 1e-30)
            stats[name] = (np.abs(o - r).max() / scale, err.max() / scale)
        total = int(np.sum(sizes))
        assert not np.asarray(out[0][total:]).any() and not np.asarray(out[1][total:]).any()
        for i in np.flatnonzero(np.asarray(sizes) == 0):
            assert not np.asarray(out[2][i]).any(), "an empty expert must get a zero dW"
        return out, stats

    @pytest.mark.parametrize(
        ("tile", "pow2_scale", "m", "k", "n", "sizes"),
        [
            # K, N not multiples of 128 or of the blocks; rows past sum(sizes) give zeros
            (16, False, 130, 129, 130, [37, 0, 50, 9, 30]),
            # block_m = 256: two 128-row Wgrad scales per tile
            (256, True, 200, 160, 96, [37, 0, 150, 9]),
        ],
    )
    def test_matches_reference_tiled_scan_and_exact_bound(self, tile, pow2_scale, m, k, n, sizes):
        """The kernel against the reference, the unquantized GEMM, and model/fp8_grouped.py on
        the same tile-padded rows (the same codes and scales in all three GEMMs there too)."""
        bs = BlockSizes(block_m=tile, block_n=64, block_k=64)
        out, stats = self.check(0, m, k, n, sizes, bs, pow2_scale)
        # kernel vs reference: f32 order only; fp8 vs exact: the E4M3 rounding, a few %
        print({name: f"{a:.1e} / {b:.1e}" for name, (a, b) in stats.items()})
        assert all(a < 1e-5 and 1e-4 < b < 0.1 for a, b in stats.values())

        x, w, g = _data(0, m, k, n, len(sizes))
        gs = jnp.asarray(sizes, jnp.int32)
        layout = tile_sorted_rows(gs, m, tile)
        scan = lambda x, w: fp8_tiled_scan(
            x, w, layout.tile_expert, layout.used_tiles[0], tile, pow2_scale
        )
        y_buf, pullback = jax.vjp(scan, _to_buffer(x, layout), w)
        dx_buf, dw = pullback(_to_buffer(g, layout))
        scanned = (_from_buffer(y_buf, layout), _from_buffer(dx_buf, layout), dw)
        _, order = _bounds(x, w, g, np.asarray(sizes), tile)
        for name, a, b, bound in zip(("y", "dx", "dw"), out, scanned, order, strict=True):
            diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
            assert np.all(diff <= bound), f"{name}: kernel differs from the tiled scan"
        if not pow2_scale:
            # Another tile quantizes the Wgrad differently, far beyond summation order (with
            # pow2 scales E4M3 rounding does not depend on the scale outside subnormals).
            other = _vjp(fp8_grouped_gemm_reference, x, w, gs, g, block_sizes=BlockSizes(8))
            assert np.abs(np.asarray(other[2]) - np.asarray(out[2])).max() > 10 * order[2].max()

    @settings(max_examples=3, deadline=None)
    @given(
        sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
        extra_rows=st.integers(0, 2),
        k=st.integers(1, 200),
        n=st.integers(1, 200),
        block_m=st.sampled_from([8, 32, 128]),
        seed=st.integers(0, 2**16),
    )
    @example(sizes=[1], extra_rows=0, k=1, n=1, block_m=8, seed=0)
    def test_ragged_groups_and_odd_shapes(self, sizes, extra_rows, k, n, block_m, seed):
        m = max(1, sum(sizes) + extra_rows)  # rows past the groups give zeros
        self.check(seed, m, k, n, sizes, BlockSizes(block_m=block_m, block_n=64, block_k=64))

    def test_dtypes(self):
        x, w, g = _data(3, 24, 20, 8, 2)
        gs = jnp.array([10, 14], jnp.int32)
        y, dx, dw = self.gemm(x.astype(jnp.bfloat16), w, gs, g, block_sizes=BlockSizes(8))
        # the operands' result type out; dX in the rows' dtype, dW in the (master) weights'
        assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
        run = lambda *a: fp8_grouped_gemm(*a, out_dtype=jnp.bfloat16, interpret=self.INTERPRET)
        assert jax.eval_shape(run, x, w, gs).dtype == jnp.bfloat16
        # The Fprop on codes is the same kernel on the same codes: bitwise equal.
        (x_q, x_s), (w_q, w_s) = quantize_rows(x.astype(jnp.bfloat16)), quantize_weights(w)
        kw = dict(block_sizes=BlockSizes(8), out_dtype=jnp.float32)
        y_codes = fp8_grouped_gemm_fprop(x_q, x_s, w_q, w_s, gs, interpret=self.INTERPRET, **kw)
        np.testing.assert_array_equal(y_codes, y)
        y_ref = fp8_grouped_gemm_fprop_reference(x_q, x_s, w_q, w_s, gs, out_dtype=jnp.float32)
        np.testing.assert_allclose(y_codes, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())

    def test_clear_errors(self):
        x, w, gs = jnp.ones((8, 16)), jnp.ones((2, 16, 4)), jnp.array([4, 4], jnp.int32)
        run = lambda *a, **kw: fp8_grouped_gemm(*a, interpret=self.INTERPRET, **kw)
        with pytest.raises(ValueError, match="rows must be 2-D"):
            run(x[None], w, gs)
        with pytest.raises(ValueError, match="weights must be 3-D"):
            run(x, w[0], gs)
        with pytest.raises(ValueError, match="contracting dims differ"):
            run(x[:, :15], w, gs)
        with pytest.raises(TypeError, match="rows must be float32/bfloat16/float16"):
            run(x.astype(jnp.float8_e4m3fn), w, gs)
        with pytest.raises(ValueError, match=r"group_sizes must be an integer array of shape"):
            run(x, w, jnp.array([4.0, 4.0]))
        with pytest.raises(ValueError, match=r"group_sizes .*shape \(2,\)"):
            run(x, w, jnp.array([8], jnp.int32))
        with pytest.raises(ValueError, match=r"block_m must be <= 128 or a multiple of 128.*200"):
            BlockSizes(block_m=200)
        with pytest.raises(ValueError, match=r"BlockSizes\.block_n must be a positive int"):
            BlockSizes(block_n=0)
        (x_q, x_s), (w_q, w_s) = quantize_rows(x), quantize_weights(w)
        fprop = lambda *a: fp8_grouped_gemm_fprop(*a, interpret=self.INTERPRET)
        with pytest.raises(TypeError, match="x_q must be 2-D float8_e4m3fn codes"):
            fprop(x, x_s, w_q, w_s, gs)
        with pytest.raises(ValueError, match=r"x_s must be float32 of shape \(8, 1\)"):
            fprop(x_q, x_s[:4], w_q, w_s, gs)
        with pytest.raises(ValueError, match=r"w_s must be float32 of shape \(2, 1, 1\)"):
            fprop(x_q, x_s, w_q, w_s[0], gs)
        with pytest.raises(TypeError, match="block_sizes must be"):
            from pallas_kernels.grouped_gemm import BlockSizes as Bf16BlockSizes

            run(x, w, gs, block_sizes=Bf16BlockSizes())
