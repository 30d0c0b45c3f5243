"""The MoE backends (MoEConfig.grouped_matmul) agree in values and gradients: the reference
loop, the XLA paths (tiled scan, dense, ragged_dot) and the Pallas kernels (interpreted on CPU).
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig
from model.config import FP8Config, GroupedMatmul
from model.moe import MoE, routed_experts
from model.transformer import Transformer
from tests.conftest import tiny_config
from train.pretrain import to_json

BACKENDS = [
    GroupedMatmul.TILED_SCAN,
    GroupedMatmul.DENSE,
    GroupedMatmul.RAGGED_DOT,
    GroupedMatmul.PALLAS,
]
RTOL = 1e-5


def _with_backend(moe_cfg, impl):
    return dataclasses.replace(moe_cfg, grouped_matmul=impl)


def _layer_values_and_grads(impl, variables, x_BxTxD):
    layer = MoE(_with_backend(tiny_config().moe, impl), init_std=0.2)

    @jax.jit
    def loss(params, x):
        out, aux = layer.apply({**variables, "params": params}, x)
        return jnp.sum(out * jnp.cos(out)), (out, aux.expert_counts)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (g_params, g_x), (out, counts) = grad(variables["params"], x_BxTxD)
    return out, counts, g_x, g_params["experts"]


def _assert_close(a, b, what):
    """Within RTOL of the reference's largest magnitude (float32 summation-order noise)."""
    a, b = np.asarray(a), np.asarray(b)
    error = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    print(f"{what}: max |diff| / max |ref| = {error:.2e}")
    assert error < RTOL, f"{what}: max |diff| / max |ref| = {error:.2e} >= {RTOL}"


@pytest.mark.parametrize("skewed", [False, True], ids=["routed", "empty-experts"])
def test_layer_backends_agree_in_values_and_grads(skewed):
    cfg = tiny_config().moe
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    variables = nn.meta.unbox(MoE(cfg, init_std=0.2).init(jax.random.key(1), x))
    if skewed:
        # The selection bias keeps every token off experts 4..7 (groups 2 and 3).
        bias = jnp.array([9.0] * 4 + [-9.0] * 4)
        variables = {**variables, "router_bias": {"router": {"bias": bias}}}
    ref_out, ref_counts, ref_gx, ref_gw = _layer_values_and_grads(
        GroupedMatmul.REFERENCE, variables, x
    )
    if skewed:
        assert (np.asarray(ref_counts)[4:] == 0).all()
    for impl in BACKENDS:
        out, counts, gx, gw = _layer_values_and_grads(impl, variables, x)
        np.testing.assert_array_equal(counts, ref_counts)
        _assert_close(out, ref_out, f"{impl.name} output")
        _assert_close(gx, ref_gx, f"{impl.name} d input")
        for name in ("wi_gate", "wi_up", "wo"):
            _assert_close(gw[name], ref_gw[name], f"{impl.name} d {name}")


def test_routed_experts_with_many_empty_experts():
    """Top-2 of 8 experts, only experts {1, 6} ever chosen; gradients w.r.t. the routing
    weights too."""
    cfg = tiny_config().moe
    kx, kw, kr = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (10, 32))
    w = {
        "wi_gate": 0.2 * jax.random.normal(kw, (8, 32, 16)),
        "wi_up": 0.2 * jax.random.normal(jax.random.fold_in(kw, 1), (8, 32, 16)),
        "wo": 0.2 * jax.random.normal(jax.random.fold_in(kw, 2), (8, 16, 32)),
    }
    experts = jnp.tile(jnp.array([[1, 6], [6, 1]], jnp.int32), (5, 1))
    weights = jax.random.uniform(kr, (10, 2))

    def run(impl):
        def f(x, w, weights):
            out = routed_experts(x, experts, weights, w, _with_backend(cfg, impl))
            return jnp.sum(out**2), out

        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(x, w, weights)

    (ref_g, ref_out) = run(GroupedMatmul.REFERENCE)
    for impl in BACKENDS:
        g, out = run(impl)
        _assert_close(out, ref_out, f"{impl.name} output")
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
            _assert_close(a, b, f"{impl.name} gradient")
        assert not np.asarray(g[1]["wo"][0]).any()  # an expert nobody chose gets zero


def test_model_forward_pallas_equals_auto():
    cfg = tiny_config(mtp_depth=0)
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), tokens.shape)
    auto = Transformer(cfg)
    variables = auto.init(jax.random.key(4), tokens, positions, None)
    pallas = Transformer(cfg.replace(moe=_with_backend(cfg.moe, GroupedMatmul.PALLAS)))
    out_auto = jax.jit(auto.apply)(variables, tokens, positions, None)
    out_pallas = jax.jit(pallas.apply)(variables, tokens, positions, None)
    for a, b in zip(jax.tree.leaves(out_pallas), jax.tree.leaves(out_auto), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [GroupedMatmul.REFERENCE, GroupedMatmul.PALLAS])
def test_config_round_trip_and_fp8_check(impl):
    cfg = tiny_config()
    cfg = cfg.replace(moe=_with_backend(cfg.moe, impl))
    data = json.loads(json.dumps(to_json(cfg)))
    assert data["moe"]["grouped_matmul"] == impl.value
    assert ModelConfig.from_dict(data) == cfg
    if impl is GroupedMatmul.PALLAS:  # the FP8 grouped GEMM kernel
        assert cfg.replace(fp8=FP8Config()).fp8 == FP8Config()
        return
    with pytest.raises(ValueError, match=f"AUTO, TILED_SCAN, DENSE or PALLAS.*got {impl.name}"):
        cfg.replace(fp8=FP8Config())
    # The layer checks too (MoE takes fp8 directly).
    x = jnp.ones((4, 32))
    with pytest.raises(ValueError, match=impl.name):
        routed_experts(x, jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2)), {
            "wi_gate": jnp.ones((8, 32, 16)), "wi_up": jnp.ones((8, 32, 16)),
            "wo": jnp.ones((8, 16, 32)),
        }, cfg.moe, fp8=FP8Config())  # fmt: skip


def test_fp8_pallas_equals_fp8_tiled_scan():
    """PALLAS + fp8 (pallas_kernels/fp8_grouped_gemm.py) against TILED_SCAN + fp8
    (model/fp8_grouped.py) in values and gradients. With the same tile (tile_rows = block_m)
    both quantize every operand of the three GEMMs identically (rows per 1x128, experts per
    128x128, the Wgrad per tile x 1), so only float32 summation order differs: RTOL. Experts
    4..7 get no tokens; 129 channels exercise the padding of K and N."""
    cfg = dataclasses.replace(tiny_config().moe, expert_dim=129, tile_rows=8)
    fp8 = FP8Config()
    kx, kw, kr = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (12, 32))
    w = {
        "wi_gate": 0.2 * jax.random.normal(kw, (8, 32, 129)),
        "wi_up": 0.2 * jax.random.normal(jax.random.fold_in(kw, 1), (8, 32, 129)),
        "wo": 0.2 * jax.random.normal(jax.random.fold_in(kw, 2), (8, 129, 32)),
    }
    experts = jax.random.randint(kr, (12, 2), 0, 4)
    weights = jax.random.uniform(jax.random.fold_in(kr, 1), (12, 2))

    def run(impl):
        def f(x, w, weights):
            out = routed_experts(x, experts, weights, w, _with_backend(cfg, impl), fp8)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(x, w, weights)

    ref_g, ref_out = run(GroupedMatmul.TILED_SCAN)
    g, out = run(GroupedMatmul.PALLAS)
    _assert_close(out, ref_out, "PALLAS fp8 output")
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
        _assert_close(a, b, "PALLAS fp8 gradient")
    assert not np.asarray(g[1]["wo"][4:]).any()  # experts nobody chose get zero
    # FP8 really ran: the unquantized experts differ by the E4M3 rounding.
    exact = jax.jit(lambda x: routed_experts(x, experts, weights, w, cfg))(x)
    gap = np.abs(np.asarray(exact) - np.asarray(out)).max() / np.abs(np.asarray(out)).max()
    assert 1e-3 < gap < 0.1, gap


def test_fp8_pallas_on_tpu_is_a_clear_error(monkeypatch):
    """The FP8 grouped GEMM has no TPU build: compiled on a TPU backend, PALLAS + fp8 says so
    instead of failing inside Mosaic or running out of VMEM."""
    from model.moe import pallas_experts

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    w = {k: jnp.ones((4, 8, 8)) for k in ("wi_gate", "wi_up", "wo")}
    experts, weights = jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"no TPU build.*tiled_scan"):
        pallas_experts(jnp.ones((2, 8)), experts, weights, w, fp8=FP8Config())
