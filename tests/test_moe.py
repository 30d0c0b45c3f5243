"""The expert-sorted grouped MoE equals the loop-over-experts reference, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import GroupedMatmul, MoEConfig
from model import grouped_matmul as gmm
from model.moe import routed_experts, routed_experts_reference
from model.routing import route

IMPLS = [GroupedMatmul.TILED_SCAN, GroupedMatmul.RAGGED_DOT, GroupedMatmul.DENSE]


def _problem(N=24, D=16, F=12, E=8, K=3, seed=0, skew=0.0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (N, D))
    logits = jax.random.normal(keys[1], (N, E)) + skew * jnp.arange(E)
    cfg = MoEConfig(E, 0, K, F, tile_rows=8)
    experts, weights = route(jax.nn.sigmoid(logits), jnp.zeros(E), cfg)
    w = {
        "wi_gate": jax.random.normal(keys[2], (E, D, F)) * 0.3,
        "wi_up": jax.random.normal(keys[3], (E, D, F)) * 0.3,
        "wo": jax.random.normal(keys[4], (E, F, D)) * 0.3,
    }
    return x, experts, weights, w, cfg


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
@pytest.mark.parametrize("skew", [0.0, 3.0], ids=["balanced", "skewed"])
def test_grouped_equals_reference(impl, skew):
    x, experts, weights, w, cfg = _problem(skew=skew)
    cfg = MoEConfig(8, 0, 3, 12, tile_rows=8, grouped_matmul=impl)
    got = jax.jit(lambda *a: routed_experts(*a, cfg))(x, experts, weights, w)
    want = routed_experts_reference(x, experts, weights, w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.value)
def test_grouped_gradients_equal_reference(impl):
    x, experts, weights, w, _ = _problem(skew=1.0)
    cfg = MoEConfig(8, 0, 3, 12, tile_rows=8, grouped_matmul=impl)

    def loss(fn, x, weights, w):
        return jnp.sum(jnp.sin(fn(x, experts, weights, w)))

    grads = jax.grad(lambda *a: loss(lambda *b: routed_experts(*b, cfg), *a), (0, 1, 2))
    ref = jax.grad(lambda *a: loss(routed_experts_reference, *a), (0, 1, 2))
    for got, want in zip(
        jax.tree.leaves(jax.jit(grads)(x, weights, w)),
        jax.tree.leaves(ref(x, weights, w)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20), min_size=4, max_size=4),
    tile=st.sampled_from([1, 2, 4, 8]),
)
def test_layout_places_every_copy_once_in_its_experts_tiles(sizes, tile):
    E, K = 4, 1
    experts = jnp.asarray(
        np.repeat(np.arange(E), sizes)[np.random.default_rng(0).permutation(sum(sizes))]
    )
    if experts.size == 0:
        return
    layout = gmm.sort_by_expert(experts[:, None], E, tile)
    dest = np.asarray(layout.dest_M)
    assert len(set(dest.tolist())) == dest.size  # no two copies share a row
    np.testing.assert_array_equal(np.asarray(layout.source_P)[dest], np.arange(dest.size) // K)
    if tile > 1:
        tile_of_copy = dest // tile
        owners = np.asarray(layout.tile_expert)[tile_of_copy]
        np.testing.assert_array_equal(owners, np.asarray(experts))
        assert int(layout.used_tiles) == sum(-(-s // tile) for s in sizes)


def test_tiled_scan_skips_unused_tiles_and_cost_tracks_routed_rows():
    # The buffer holds at most ceil(M / tile) + E tiles: linear in routed rows, not N * E.
    _, experts, _, _, _ = _problem(N=64, E=8, K=2)
    layout = gmm.sort_by_expert(experts, 8, 8)
    assert layout.source_P.shape[0] == (-(-experts.size // 8) + 8) * 8
    assert int(layout.used_tiles) * 8 < layout.source_P.shape[0]


def test_choose_tile():
    assert gmm.choose_tile(8192, 32, 256) == 64  # bench-d512: mean 256 rows per expert
    assert gmm.choose_tile(8192, 16, 256) == 128  # bench-small: mean 512
    assert gmm.choose_tile(64, 8, 256) == 8  # floor
    assert gmm.choose_tile(1 << 20, 8, 256) == 256  # cap


def test_auto_picks_dense_for_few_tokens_on_cpu():
    assert gmm.resolve(GroupedMatmul.AUTO, 8, 16) is GroupedMatmul.DENSE
    assert gmm.resolve(GroupedMatmul.AUTO, 2048, 16) is GroupedMatmul.TILED_SCAN
    assert gmm.resolve(GroupedMatmul.RAGGED_DOT, 8, 16) is GroupedMatmul.RAGGED_DOT
