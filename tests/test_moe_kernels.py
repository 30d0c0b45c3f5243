"""MoE permute / combine and grouped GEMM kernels against their jnp references.

Both kernels only move rows or sum float32 products, so values agree with the references up
to float32 summation order (permute is exact); gradients are compared with `jax.grad` of the
references. On CPU the kernels run with interpret=True, on an accelerator compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pallas_kernels import grouped_gemm as gg
from pallas_kernels import moe_permute as mp

RTOL = ATOL = 1e-5  # float32, a sum of a few dozen products


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _routing(rng, n, k, e, skip_expert=None):
    """Distinct experts per token (as top-k routing), optionally never choosing one expert."""
    choices = [i for i in range(e) if i != skip_expert]
    experts = np.stack([rng.choice(choices, k, replace=False) for _ in range(n)])
    return jnp.asarray(experts.reshape(n, k), jnp.int32), jnp.asarray(rng.random((n, k)))


def _close(a, b, scale=1.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL * scale)


class PermuteChecks:
    """permute/combine of one build (VARIANT) against the references; the TPU build's tests
    (tests/test_moe_kernels_tpu.py) reuse it."""

    INTERPRET = jax.default_backend() == "cpu"
    VARIANT = "generic"

    def permute(self, *args, **kw):
        return mp.permute(*args, interpret=self.INTERPRET, variant=self.VARIANT, **kw)

    def combine(self, *args, **kw):
        return mp.combine(*args, interpret=self.INTERPRET, variant=self.VARIANT, **kw)

    def check(self, n, k, e, d, block, seed, grads=True):
        """Values and (with grads) gradients w.r.t. x and the weights against the references."""
        rng = np.random.default_rng(seed)
        x = _normal(rng, (n, d))
        experts, weights = _routing(rng, n, k, e, skip_expert=seed % e)  # one empty expert
        rows, w_M, sizes, idx = self.permute(x, experts, weights, e, block_sizes=block)
        ref_rows, ref_w, ref_sizes, ref_idx = mp.permute_reference(x, experts, weights, e)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(w_M, ref_w)
        np.testing.assert_array_equal(sizes, ref_sizes)
        assert int(sizes[seed % e]) == 0 and int(sizes.sum()) == n * k
        # grouped by expert in expert order, token order kept inside a group (stable)
        sorted_experts = np.asarray(experts).reshape(-1)[np.asarray(idx.copy_M)]
        np.testing.assert_array_equal(sorted_experts, np.repeat(np.arange(e), sizes))
        tokens = np.asarray(idx.copy_M) // k
        for g in np.split(tokens, np.cumsum(sizes)[:-1]):
            assert np.all(np.diff(g) > 0)

        out = self.combine(rows * 3.0, w_M, idx, block_sizes=block)
        _close(out, mp.combine_reference(ref_rows * 3.0, ref_w, ref_idx), scale=3 * k)
        if not grads:
            return

        def loss(permute_fn, combine_fn):
            def f(x, weights):
                r, wm, _, i = permute_fn(x, experts, weights, e)
                return jnp.sum(jnp.sin(combine_fn(jnp.tanh(r) * 2.0, wm, i)))

            return jax.grad(f, argnums=(0, 1))(x, weights)

        grads = loss(
            lambda *a: self.permute(*a, block_sizes=block),
            lambda *a: self.combine(*a, block_sizes=block),
        )
        ref_grads = loss(mp.permute_reference, mp.combine_reference)
        for g, r in zip(grads, ref_grads, strict=True):
            _close(g, r, scale=2 * k)


class TestMoePermute(PermuteChecks):
    @settings(max_examples=5, deadline=None)
    @given(
        n=st.integers(1, 19),
        k=st.integers(1, 3),
        e=st.integers(4, 7),  # k distinct experts besides the one left empty
        d=st.integers(1, 9),
        # (1, 3, 2): D tiles of 2 columns, odd D padded
        block=st.sampled_from([None, mp.BlockSizes(4, 8), mp.BlockSizes(1, 3, 2)]),
        seed=st.integers(0, 2**16),
    )
    @example(n=5, k=2, e=4, d=3, block=mp.BlockSizes(4, 8), seed=0)
    @example(n=1, k=3, e=4, d=1, block=None, seed=0)
    def test_matches_reference_values_and_grads(self, n, k, e, d, block, seed):
        self.check(n, k, e, d, block, seed)

    @pytest.mark.parametrize(
        "n, k, e, d, block",
        [
            (11, 3, 5, 37, mp.BlockSizes(4, 8, 8)),  # 5 tiles, the last 5 of 8 columns wide
            (9, 6, 8, 24, mp.BlockSizes(4, 4, 16)),  # top-6 (K not a power of two), 2 tiles
            (6, 2, 4, 40, mp.BlockSizes(8, 8, 8)),  # D a multiple of block_d: no padding
        ],
    )
    def test_d_tiles(self, n, k, e, d, block):
        self.check(n, k, e, d, block, seed=d)

    def test_k1_unit_weights_is_identity(self):
        rng = np.random.default_rng(1)
        x = _normal(rng, (13, 5))
        experts = jnp.asarray(rng.integers(0, 6, (13, 1)), jnp.int32)
        rows, w_M, _, idx = self.permute(x, experts, jnp.ones((13, 1)), 6)
        np.testing.assert_array_equal(self.combine(rows, w_M, idx), x)
        # and the gradient of the round trip is the identity too
        round_trip = lambda x: self.combine(self.permute(x, experts, w_M[:, None], 6)[0], w_M, idx)
        g = jax.grad(lambda x: jnp.sum(round_trip(x) * x))(x)
        np.testing.assert_array_equal(g, 2 * x)

    def test_clear_errors(self):
        x, experts, w = jnp.ones((4, 3)), jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2))
        with pytest.raises(ValueError, match=r"x must be 2-D \[N, D\]"):
            self.permute(x[None], experts, w, 3)
        with pytest.raises(ValueError, match=r"expert_idx must be \[N, K\] with N = 4"):
            self.permute(x, experts[:3], w, 3)
        with pytest.raises(TypeError, match="expert_idx must be an integer array"):
            self.permute(x, experts.astype(jnp.float32), w, 3)
        with pytest.raises(ValueError, match="weights shape"):
            self.permute(x, experts, w[:, :1], 3)
        with pytest.raises(TypeError, match="x must be float32/bfloat16/float16"):
            self.permute(x.astype(jnp.int32), experts, w, 3)
        with pytest.raises(ValueError, match="num_experts must be a positive int"):
            self.permute(x, experts, w, 0)
        rows, w_M, _, idx = self.permute(x, experts, w, 3)
        with pytest.raises(ValueError, match=r"must have M = N \* K = 8 rows"):
            self.combine(rows[:7], w_M, idx)
        with pytest.raises(ValueError, match=r"BlockSizes\.block_rows must be a positive int"):
            mp.BlockSizes(block_rows=0)

    def test_block_d_validation(self):
        for bad in (24, 3, 7168):
            with pytest.raises(ValueError, match=rf"block_d must be a power of two.*got {bad}"):
                mp.BlockSizes(block_d=bad)
        with pytest.raises(ValueError, match=r"BlockSizes\.block_d must be a positive int"):
            mp.BlockSizes(block_d=0)
        assert mp.BlockSizes(block_d=1).block_d == 1
        # one movers object per block_d: jit's cache of the custom_vjp wiring keys on it
        assert mp.generic_movers(64) is mp.generic_movers(64)


class GroupedGemmChecks:
    """grouped_gemm of one build (VARIANT) against ragged_dot; reused for the TPU build."""

    INTERPRET = jax.default_backend() == "cpu"
    VARIANT = "generic"

    def gmm(self, *args, **kw):
        return gg.grouped_gemm(*args, interpret=self.INTERPRET, variant=self.VARIANT, **kw)

    def check(self, sizes, k, n, slack=0, block=None, seed=0):
        rng = np.random.default_rng(seed)
        sizes = jnp.asarray(sizes, jnp.int32)
        m = int(sizes.sum()) + slack
        x, w = _normal(rng, (m, k)), _normal(rng, (sizes.shape[0], k, n))
        out = self.gmm(x, w, sizes, block_sizes=block)
        ref = gg.grouped_gemm_reference(x, w, sizes)
        assert out.shape == (m, n) and out.dtype == jnp.float32
        _close(out, ref, scale=k)
        np.testing.assert_array_equal(out[m - slack :], 0.0)

        def grads(fn):
            f = lambda x, w: jnp.sum(jnp.sin(fn(x, w, sizes)))
            return jax.grad(f, argnums=(0, 1))(x, w)

        kernel_grads = grads(lambda x, w, s: self.gmm(x, w, s, block_sizes=block))
        for g, r in zip(kernel_grads, grads(gg.grouped_gemm_reference), strict=True):
            _close(g, r, scale=max(k, n, m))
        # empty experts get an exactly zero weight gradient
        empty = np.asarray(sizes) == 0
        np.testing.assert_array_equal(np.asarray(kernel_grads[1])[empty], 0.0)

    def check_bf16(self):
        """bf16 operands: bf16 output by default, f32 on request."""
        rng = np.random.default_rng(4)
        sizes = jnp.asarray([5, 0, 11], jnp.int32)
        x = _normal(rng, (16, 8)).astype(jnp.bfloat16)
        w = _normal(rng, (3, 8, 6)).astype(jnp.bfloat16)
        out = self.gmm(x, w, sizes)
        assert out.dtype == jnp.bfloat16
        ref = gg.grouped_gemm_reference(x, w, sizes, out_dtype=jnp.float32)
        np.testing.assert_allclose(np.float32(out), ref, rtol=1e-2, atol=1e-2)
        out32 = self.gmm(x, w, sizes, out_dtype=jnp.float32)
        _close(out32, ref, scale=8)


class TestGroupedGemm(GroupedGemmChecks):
    @settings(max_examples=5, deadline=None)
    @given(
        sizes=st.lists(st.integers(0, 13), min_size=1, max_size=6),
        k=st.integers(1, 20),
        n=st.integers(1, 20),
        slack=st.integers(0, 3),
        block=st.sampled_from([None, gg.BlockSizes(8, 8, 8), gg.BlockSizes(4, 16, 4)]),
        seed=st.integers(0, 2**16),
    )
    @example(sizes=[0, 7, 0, 0, 9], k=5, n=3, slack=2, block=gg.BlockSizes(8, 8, 8), seed=0)
    @example(sizes=[0, 0, 0], k=3, n=4, slack=1, block=None, seed=1)
    def test_ragged_groups_match_ragged_dot(self, sizes, k, n, slack, block, seed):
        if sum(sizes) + slack == 0:
            slack = 1
        self.check(sizes, k, n, slack, block, seed)

    def test_multi_tile_groups(self):
        self.check([40, 3, 0, 17], k=24, n=40, block=gg.BlockSizes(16, 16, 16), seed=3)

    def test_bf16_inputs_and_out_dtype(self):
        self.check_bf16()

    def test_clear_errors(self):
        x, w, s = jnp.ones((6, 4)), jnp.ones((2, 4, 3)), jnp.asarray([3, 3], jnp.int32)
        with pytest.raises(ValueError, match=r"rows must be 2-D \[M, K\]"):
            self.gmm(x[None], w, s)
        with pytest.raises(ValueError, match=r"weights must be 3-D \[E, K, N\]"):
            self.gmm(x, w[0], s)
        with pytest.raises(ValueError, match="contracting dims differ"):
            self.gmm(x[:, :3], w, s)
        with pytest.raises(
            ValueError, match=r"group_sizes must be an integer array of shape \(2,\)"
        ):
            self.gmm(x, w, s[:1])
        with pytest.raises(ValueError, match="group_sizes must be an integer array"):
            self.gmm(x, w, s.astype(jnp.float32))
        with pytest.raises(TypeError, match="rows must be float32/bfloat16/float16"):
            self.gmm(x.astype(jnp.int32), w, s)
        with pytest.raises(ValueError, match=r"BlockSizes\.block_m must be a positive int"):
            gg.BlockSizes(block_m=-1)
