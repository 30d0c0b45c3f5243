"""TPU builds of the MoE kernels (grouped_gemm_tpu.py, moe_permute_tpu.py) against the jnp
references: values and gradients, ragged groups with empty experts, shapes that are not
block multiples.

On CPU the kernels run interpreted: INTERPRET = True is Pallas' generic interpreter, and the
*TpuInterpreter classes rerun a fixed case under `pltpu.InterpretParams()`, whose uninitialized
memory is NaN and whose out-of-bounds reads raise, so an output block the kernel never writes
(e.g. an empty expert's dW) or a DMA at a wrong row would fail there. On a TPU the same tests
run compiled (never tried: no TPU in CI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import grouped_gemm as gg
from pallas_kernels import grouped_gemm_tpu as ggt
from pallas_kernels import moe_permute as mp
from pallas_kernels._blocks import kernel_variant
from pallas_kernels.sort_by_expert import tile_sorted_rows
from tests.test_moe_kernels import GroupedGemmChecks, PermuteChecks

ON_CPU = jax.default_backend() == "cpu"
tpu_interpreter = pytest.mark.skipif(not ON_CPU, reason="interpreter check; compiled elsewhere")


class _GroupedGemmChecks(GroupedGemmChecks):
    INTERPRET: bool | pltpu.InterpretParams = ON_CPU
    VARIANT = "tpu"


class TestGroupedGemmTpu(_GroupedGemmChecks):
    @settings(max_examples=2, deadline=None)
    @given(
        sizes=st.lists(st.integers(0, 13), min_size=1, max_size=6),
        k=st.integers(1, 20),
        n=st.integers(1, 20),
        slack=st.integers(0, 3),
        block=st.sampled_from([None, gg.BlockSizes(8, 8, 8), gg.BlockSizes(4, 16, 4)]),
        seed=st.integers(0, 2**16),
    )
    @example(sizes=[0, 7, 0, 0, 9], k=5, n=3, slack=2, block=gg.BlockSizes(8, 8, 8), seed=0)
    def test_ragged_groups_match_ragged_dot(self, sizes, k, n, slack, block, seed):
        if sum(sizes) + slack == 0:
            slack = 1
        self.check(sizes, k, n, slack, block, seed)

    def test_multi_tile_groups_several_k_and_n_blocks(self):
        # 3 K blocks and 2 N blocks: the K accumulator and the dW walk revisit blocks
        self.check([40, 3, 0, 17], k=20, n=20, block=gg.BlockSizes(16, 16, 8), seed=3)

    def test_bf16_inputs_and_out_dtype(self):
        self.check_bf16()

    def test_variant_dispatch(self):
        x, w, s = jnp.ones((6, 4)), jnp.ones((2, 4, 3)), jnp.asarray([3, 3], jnp.int32)
        jaxpr = lambda v: str(
            jax.make_jaxpr(lambda x: gg.grouped_gemm(x, w, s, interpret=True, variant=v))(x)
        )
        assert "_grouped_gemm_tpu" in jaxpr("tpu")
        assert "_grouped_gemm_tpu" not in jaxpr("generic")
        assert kernel_variant("auto") == ("tpu" if jax.default_backend() == "tpu" else "generic")
        with pytest.raises(ValueError, match="variant must be one of"):
            gg.grouped_gemm(x, w, s, variant="gpu")

    @pytest.mark.parametrize("sizes", [[0, 5, 0, 21, 0], [9], [0, 0, 3]])
    def test_visit_plan_walks_each_tile_once(self, sizes):
        block_m, sizes = 4, jnp.asarray(sizes, jnp.int32)
        m = int(sizes.sum()) + 2
        num_visits = -(-m // block_m) + sizes.shape[0]
        layout, plan = jax.jit(
            lambda s: (rows := tile_sorted_rows(s, m, block_m), ggt.visit_plan(rows, num_visits))
        )(sizes)
        tile, expert, flags = (np.asarray(a) for a in (plan.tile, plan.expert, plan.flags))
        live = (flags & ggt.LIVE) != 0
        used = int(layout.used_tiles[0])
        np.testing.assert_array_equal(tile[live], np.arange(used))  # every used tile, in order
        np.testing.assert_array_equal(expert[live], np.asarray(layout.tile_expert)[:used])
        num_tiles = layout.num_rows // block_m
        assert tile.min() >= 0 and tile.max() < num_tiles
        for e in range(sizes.shape[0]):  # one run of visits per expert, FIRST ... LAST
            (v,) = np.nonzero(expert[flags != 0] == e)
            run_flags = flags[flags != 0][v]
            assert len(v) == max(int(layout.tile_count_E[e]), 1) and np.all(np.diff(v) == 1)
            assert run_flags[0] & ggt.FIRST and run_flags[-1] & ggt.LAST
            assert np.count_nonzero(run_flags & (ggt.FIRST | ggt.LAST)) <= 2
        # visits without rows repeat the previous tile (no DMA); the padding repeats the last
        (rowless,) = np.nonzero(~live[1:])
        np.testing.assert_array_equal(tile[rowless + 1], tile[rowless])
        real = int(np.count_nonzero(flags))
        assert np.all(flags[real:] == 0) and np.all(expert[real:] == sizes.shape[0] - 1)


@tpu_interpreter
class TestGroupedGemmTpuInterpreter(_GroupedGemmChecks):
    INTERPRET = pltpu.InterpretParams()

    def test_empty_experts_unused_tiles_several_blocks(self):
        # empty first, middle and last experts; 2 K and 2 N blocks; slack rows; unused tiles
        self.check([0, 9, 0, 6, 0], k=12, n=10, slack=3, block=gg.BlockSizes(4, 8, 8), seed=5)


class _PermuteChecks(PermuteChecks):
    INTERPRET: bool | pltpu.InterpretParams = ON_CPU
    VARIANT = "tpu"


class TestMoePermuteTpu(_PermuteChecks):
    @settings(max_examples=1, deadline=None)
    @given(
        n=st.integers(1, 19),
        k=st.integers(1, 3),
        e=st.integers(4, 7),
        d=st.integers(1, 9),
        block=st.sampled_from([None, mp.BlockSizes(4, 8), mp.BlockSizes(1, 3)]),
        seed=st.integers(0, 2**16),
    )
    @example(n=5, k=2, e=4, d=3, block=mp.BlockSizes(4, 8), seed=0)
    def test_matches_reference_values_and_grads(self, n, k, e, d, block, seed):
        self.check(n, k, e, d, block, seed)

    def test_variant_dispatch(self):
        x, experts, w = jnp.ones((4, 3)), jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2))
        experts = experts.at[:, 1].set(1)
        jaxpr = lambda v: str(
            jax.make_jaxpr(lambda x: mp.permute(x, experts, w, 3, interpret=True, variant=v))(x)
        )
        assert "dma_start" in jaxpr("tpu") and "dma_start" not in jaxpr("generic")
        with pytest.raises(ValueError, match="variant must be one of"):
            mp.combine(jnp.ones((8, 3)), jnp.ones(8), mp.sort_indices(experts, 3)[0], variant="x")


@tpu_interpreter
class TestMoePermuteTpuInterpreter(_PermuteChecks):
    INTERPRET = pltpu.InterpretParams()

    def test_ragged_blocks(self):
        # 7 tokens, top-3: neither rows (21) nor tokens fill the blocks. Values only: the
        # backward passes run these same two kernels (checked by TestMoePermuteTpu).
        self.check(n=7, k=3, e=5, d=6, block=mp.BlockSizes(8, 4), seed=2, grads=False)
