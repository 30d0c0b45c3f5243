"""The FP8 linear layer (Fprop/Dgrad/Wgrad in E4M3), the FP8 grouped matmul and the model switch.

Bounds. Each GEMM C = A B with per-tile quantization (tests/test_fp8_gemm.py derives it):
  |C_fp8 - A B| <= (2 * 2^-4 + 2^-8) sum_k |a||b| + subnormal terms (<= 2^-10 s per element)
                   + (K + 3) 2^-24 sum_k |a_hat||b_hat|  (float32 accumulation).
Against a float64 emulation of the same quantization only the last term is left; kernel and
reference differ by at most 2 (128 + 3) 2^-24 sum_k |a_hat||b_hat| (summation order).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import model
from model import FP8Config, GroupedMatmul, ModelConfig
from model import grouped_matmul as gmm
from model import layers as model_layers
from model.moe import routed_experts
from pallas_kernels.fp8 import AMAX_FLOOR, FP8_MAX, quantize_blocks, quantize_rows
from pallas_kernels.fp8_gemm import fp8_gemm_reference
from pallas_kernels.fp8_linear import fp8_linear, quantize_cols
from tests.conftest import tiny_config
from train.pretrain import to_json

BLOCK = 128
# Per GEMM, relative to sum_k |a||b|: two E4M3 roundings and their product.
F32_BOUND = 2 * 2.0**-4 + 2.0**-8


def _fq_rows(x: np.ndarray, pow2: bool) -> np.ndarray:
    """float64 fake quantization per 1x128 tile of the last axis (scales as in float32)."""
    m, k = x.shape
    kb = -(-k // BLOCK)
    tiles = np.pad(x.astype(np.float32), ((0, 0), (0, kb * BLOCK - k))).reshape(m, kb, BLOCK)
    s = np.maximum(np.abs(tiles).max(-1, keepdims=True), np.float32(AMAX_FLOOR))
    s = s / np.float32(FP8_MAX)
    if pow2:
        s = np.float32(2.0) ** np.ceil(np.log2(s.astype(np.float64))).astype(np.float32)
    codes = np.clip(tiles / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return (codes.astype(np.float64) * s).reshape(m, kb * BLOCK)[:, :k]


def _fq_blocks(w: np.ndarray, pow2: bool) -> np.ndarray:
    """float64 fake quantization per 128x128 block."""
    k, n = w.shape
    kb, nb = -(-k // BLOCK), -(-n // BLOCK)
    w32 = np.pad(w.astype(np.float32), ((0, kb * BLOCK - k), (0, nb * BLOCK - n)))
    blocks = w32.reshape(kb, BLOCK, nb, BLOCK)
    s = np.maximum(np.abs(blocks).max(axis=(1, 3), keepdims=True), np.float32(AMAX_FLOOR))
    s = s / np.float32(FP8_MAX)
    if pow2:
        s = np.float32(2.0) ** np.ceil(np.log2(s.astype(np.float64))).astype(np.float32)
    codes = np.clip(blocks / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return (codes.astype(np.float64) * s).reshape(kb * BLOCK, nb * BLOCK)[:k, :n]


def _emulate(x, w, dy, pow2):
    """(y, dx, dw) of V3's three FP8 GEMMs in float64, and the |A_hat||B_hat| of each."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    xr, wb = _fq_rows(x, pow2), _fq_blocks(w, pow2)
    dyr, wtb = _fq_rows(dy, pow2), _fq_blocks(w.T, pow2)
    xtr, dyc = _fq_rows(x.T, pow2), _fq_rows(dy.T, pow2).T
    pairs = ((xr, wb), (dyr, wtb), (xtr, dyc))
    return [a @ b for a, b in pairs], [np.abs(a) @ np.abs(b) for a, b in pairs]


def _data(seed, shape, spread=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if spread:
        x *= 10.0 ** rng.uniform(-spread, spread, size=(*shape[:-1], 1))
    return x.astype(np.float32)


def _value_and_grads(x, w, dy, **kw):
    y, vjp = jax.vjp(lambda x, w: fp8_linear(x, w, **kw), x, w)
    dx, dw = vjp(jnp.asarray(dy, y.dtype))
    return y, dx, dw


M, K, N = 140, 200, 300  # no dimension a multiple of 128: ragged tiles everywhere


class TestFp8Linear:
    INTERPRET = jax.default_backend() == "cpu"

    def _run(self, x, w, dy, use_kernel, pow2=False):
        kw = dict(use_kernel=use_kernel, interpret=self.INTERPRET, pow2_scale=pow2)
        return _value_and_grads(x, w, dy, **kw)

    @pytest.mark.parametrize("pow2", [False, True])
    def test_three_gemms_match_float64_emulation(self, pow2):
        x, w, dy = _data(0, (M, K), spread=2), 0.05 * _data(1, (K, N)), _data(2, (M, N), 1)
        got = self._run(x, w, dy, use_kernel=False, pow2=pow2)
        want, mags = _emulate(x, w, dy, pow2)
        for g, e, mag, k in zip(got, want, mags, (K, N, M), strict=True):
            err = np.abs(np.asarray(g, np.float64) - e)
            assert np.all(err <= (k + 3) * 2.0**-24 * mag + 1e-30), err.max()

    def test_close_to_unquantized_f32_linear(self):
        x, w, dy = _data(3, (M, K)), 0.05 * _data(4, (K, N)), _data(5, (M, N))
        got = self._run(x, w, dy, use_kernel=False)
        x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
        exact = (x64 @ w64, dy64 @ w64.T, x64.T @ dy64)
        mags = (
            np.abs(x64) @ np.abs(w64),
            np.abs(dy64) @ np.abs(w64.T),
            np.abs(x64.T) @ np.abs(dy64),
        )
        for g, e, mag in zip(got, exact, mags, strict=True):
            err = np.abs(np.asarray(g, np.float64) - e)
            # + 1e-6 of the largest magnitude covers the subnormal and f32 terms here.
            assert np.all(err <= F32_BOUND * mag + 1e-6 * mag.max())
            # Typical error is far below the worst case: ~2-4% of the output's RMS.
            assert np.sqrt(np.mean(err**2)) < 0.05 * np.sqrt(np.mean(e**2))

    def test_kernel_equals_reference(self):
        x, w, dy = _data(6, (2, 70, K)), 0.05 * _data(7, (K, N)), _data(8, (2, 70, N))
        ref = self._run(x, w, dy, use_kernel=False)
        ker = self._run(x, w, dy, use_kernel=True)
        _, mags = _emulate(x.reshape(M, K), w, dy.reshape(M, N), False)
        for r, k_, mag in zip(ref, ker, mags, strict=True):
            diff = np.abs(np.asarray(r, np.float64) - np.asarray(k_)).reshape(mag.shape)
            assert np.all(diff <= 2 * (BLOCK + 3) * 2.0**-24 * mag)

    def test_dtypes_and_leading_dims(self):
        x = jnp.asarray(_data(9, (3, 5, K)), jnp.bfloat16)
        w = jnp.asarray(0.05 * _data(10, (K, N)))
        y, dx, dw = _value_and_grads(x, w, np.ones((3, 5, N)), use_kernel=False, interpret=False)
        assert (y.shape, y.dtype, dx.dtype, dw.dtype) == ((3, 5, N), jnp.bfloat16, x.dtype, w.dtype)
        y32 = fp8_linear(x, w, use_kernel=False, interpret=False, out_dtype=jnp.float32)
        assert y32.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(y32.astype(jnp.bfloat16)), np.asarray(y))

    def test_transposed_block_codes_and_column_scales(self):
        w, x = _data(11, (K, N)), _data(12, (5, K))
        q, s = quantize_blocks(w)
        qt, st = quantize_blocks(w.T)
        np.testing.assert_array_equal(np.asarray(q.T, np.float32), np.asarray(qt, np.float32))
        np.testing.assert_array_equal(np.asarray(s.T), np.asarray(st))
        qc, sc = quantize_cols(w)
        assert qc.shape == (K, N) and sc.shape == (2, N)
        with pytest.raises(ValueError, match="b_scale_per_column"):
            fp8_gemm_reference(*quantize_rows(x), qc, sc[:, :3], b_scale_per_column=True)
        out = fp8_gemm_reference(*quantize_rows(x), qc, sc, b_scale_per_column=True)
        want = _fq_rows(x, False) @ _fq_rows(w.T, False).T
        np.testing.assert_allclose(out, want, rtol=1e-2, atol=1e-4)

    def test_clear_errors(self):
        with pytest.raises(ValueError, match="fp8_linear needs"):
            fp8_linear(jnp.ones((4, 8)), jnp.ones((9, 3)), use_kernel=False, interpret=False)
        with pytest.raises(TypeError, match="float16/bfloat16/float32"):
            fp8_linear(
                jnp.ones((4, 8), jnp.int32), jnp.ones((8, 3)), use_kernel=False, interpret=False
            )


def _experts(seed, E=4, D=40, F=24):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = {"wi_gate": (E, D, F), "wi_up": (E, D, F), "wo": (E, F, D)}
    return {
        n: 0.2 * jax.random.normal(k, s) for k, (n, s) in zip(keys, shapes.items(), strict=True)
    }


def test_fp8_routed_experts_match_a_per_expert_loop():
    """Tiled scan and dense FP8 paths vs fp8_linear per expert on every token, weighted."""
    N_tok, E, top_k, D = 48, 4, 2, 40
    w = _experts(0, E, D)
    x = jax.random.normal(jax.random.key(1), (N_tok, D))
    experts = jnp.argsort(jax.random.uniform(jax.random.key(2), (N_tok, E)), axis=1)[:, :top_k]
    weights = jax.random.uniform(jax.random.key(3), (N_tok, top_k))
    fp8 = FP8Config()
    dot = lambda a, b: model_layers.fp8_dot(a, b, fp8)

    def loop(x, w):
        out = jnp.zeros_like(x)
        for e in range(E):
            coeff = jnp.where(experts == e, weights, 0.0).sum(-1)
            h = jax.nn.silu(dot(x, w["wi_gate"][e])) * dot(x, w["wi_up"][e])
            out = out + coeff[:, None] * dot(h, w["wo"][e])
        return out

    def run(fn):
        return jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), (0, 1))(x, w)

    (v_ref, (dx_ref, dw_ref)) = run(loop)
    for impl in (GroupedMatmul.TILED_SCAN, GroupedMatmul.DENSE):
        cfg = model.MoEConfig(E, 0, top_k, 24, grouped_matmul=impl, tile_rows=8)
        v, (dx, dw) = run(lambda x, w, c=cfg: routed_experts(x, experts, weights, w, c, fp8))
        # Row-wise quantization makes Fprop and Dgrad the same per row: f32 order only.
        np.testing.assert_allclose(v, v_ref, rtol=1e-5)
        if impl is GroupedMatmul.TILED_SCAN:
            np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
        # The Wgrad's 128x1 token tiles differ (a tile vs all tokens): close, not equal.
        for name in w:
            gap = np.linalg.norm(dw[name] - dw_ref[name]) / np.linalg.norm(dw_ref[name])
            assert gap < 0.05, (impl, name, gap)
    layout = gmm.sort_by_expert(experts, E, 1)
    with pytest.raises(ValueError, match="RAGGED_DOT"):
        gmm.grouped_matmul(
            x[layout.source_P % N_tok], w["wi_up"], layout, GroupedMatmul.RAGGED_DOT, fp8
        )


def _moe_tiled(cfg: ModelConfig, **fp8) -> ModelConfig:
    moe = dataclasses.replace(cfg.moe, grouped_matmul=GroupedMatmul.TILED_SCAN)
    return cfg.replace(moe=moe, fp8=FP8Config(**fp8))


class TestModelSwitch:
    # A realistic init scale: with init_std=0.2 the tiny model is chaotic (bf16 alone moves
    # its logits by ~12%); at 0.02 bf16 moves them ~0.5%, FP8 ~2% (measured).
    cfg = tiny_config(init_std=0.02)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 97)

    def test_forward_and_loss_close_to_fp8_off(self):
        v = model.init(self.cfg, jax.random.key(0))
        forward = jax.jit(model.forward, static_argnums=0)
        base = np.asarray(forward(self.cfg, v, self.tokens).logits)
        out = np.asarray(forward(_moe_tiled(self.cfg), v, self.tokens).logits)
        rel = np.abs(out - base).mean() / np.abs(base).mean()
        assert 1e-4 < rel < 0.03, rel  # measured 0.018

        def loss(params, cfg):
            logits = model.forward(cfg, {**v, "params": params}, self.tokens).logits
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.take_along_axis(logp, self.tokens[:, 1:, None], -1).mean()

        l0 = loss(v["params"], self.cfg)
        l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
            v["params"], _moe_tiled(self.cfg)
        )
        assert abs(float(l1) / float(l0) - 1) < 1e-3  # measured 1.5e-4 (random init: loss ~ log V)
        leaves = jax.tree.leaves(g1)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        # Every FP8 weight (including the routed experts) still gets a gradient.
        experts = g1["moe_layers"]["moe"]["experts"]
        assert all(float(jnp.abs(experts[n]).sum()) > 0 for n in ("wi_gate", "wi_up", "wo"))

    def test_only_the_intended_projections_run_in_fp8(self, monkeypatch):
        seen = []
        real = model_layers.fp8_linear

        def record(x, w, **kw):
            seen.append(tuple(w.shape))
            return real(x, w, **kw)

        monkeypatch.setattr(model_layers, "fp8_linear", record)
        cfg = _moe_tiled(self.cfg)
        v = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
        jaxpr = jax.make_jaxpr(lambda v: model.forward(cfg, v, self.tokens).logits)(v)
        c, m = cfg.mla, cfg.moe
        heads_kv = c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)
        attention = {
            (cfg.d_model, c.q_lora_rank),  # wq_a
            (c.q_lora_rank, c.num_heads * c.qk_head_dim),  # wq_b
            (cfg.d_model, c.kv_lora_rank + c.qk_rope_head_dim),  # wkv_a
            (c.kv_lora_rank, heads_kv),  # wkv_b
            (c.num_heads * c.v_head_dim, cfg.d_model),  # wo
        }
        ffn = {(cfg.d_model, cfg.dense_dim), (cfg.dense_dim, cfg.d_model)}
        shared = {(cfg.d_model, m.expert_dim), (m.expert_dim, cfg.d_model)}
        # Not here: the head (d_model, vocab), the router (d_model, E), MTP's eh_proj (2d, d).
        assert set(seen) == attention | ffn | shared
        # The routed experts' tiled scan quantizes too (its own path, not fp8_linear).
        assert "float8_e4m3fn" in str(jaxpr)
        off = jax.make_jaxpr(lambda v: model.forward(self.cfg, v, self.tokens).logits)(v)
        assert "float8" not in str(off)

    def test_kernel_switch_equals_reference_in_the_model(self):
        v = model.init(self.cfg, jax.random.key(0))
        forward = jax.jit(model.forward, static_argnums=0)
        ref = forward(_moe_tiled(self.cfg), v, self.tokens).logits
        ker = forward(_moe_tiled(self.cfg, use_kernel=True), v, self.tokens).logits
        np.testing.assert_allclose(ker, ref, rtol=1e-4, atol=1e-5)


def test_config_round_trip_and_errors():
    cfg = tiny_config(fp8=FP8Config(use_kernel=True, pow2_scale=True))
    assert ModelConfig.from_dict(to_json(cfg)) == cfg
    assert ModelConfig.from_dict(to_json(tiny_config())).fp8 is None
    legacy = to_json(tiny_config())
    del legacy["fp8"]  # configs stored before the field existed
    assert ModelConfig.from_dict(legacy) == tiny_config()
    with pytest.raises(ValueError, match=r"FP8Config\.use_kernel must be a bool"):
        FP8Config(use_kernel="yes")
    with pytest.raises(ValueError, match=r"ModelConfig\.fp8 must be an FP8Config"):
        tiny_config(fp8=True)
    ragged = dataclasses.replace(tiny_config().moe, grouped_matmul=GroupedMatmul.RAGGED_DOT)
    with pytest.raises(ValueError, match="RAGGED_DOT"):
        tiny_config(moe=ragged, fp8=FP8Config())
