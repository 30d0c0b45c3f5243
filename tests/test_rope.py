"""RoPE with interleaved pairs, YaRN frequency correction and softmax scale (PAPER_FACTS)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import MLAConfig, YarnConfig, rope


def test_v3_yarn_ramp_bounds_and_softmax_scale():
    mla = model.presets.get("v3-671b").mla
    assert rope._yarn_correction_range(64, 10000.0, mla.yarn) == (10, 23)
    assert rope.softmax_scale(mla) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert rope.softmax_scale(mla) == pytest.approx(0.135234, abs=1e-6)
    assert rope.softmax_scale(mla.__class__(128, 1536, 512, 128, 64, 128)) == pytest.approx(
        0.072169, abs=1e-6
    )
    assert rope.rope_attention_factor(mla) == 1.0


def test_yarn_frequencies_follow_the_formula():
    mla = model.presets.get("v3-671b").mla
    freqs = rope.rope_frequencies(mla)
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    ramp = np.clip((np.arange(32) - 10) / (23 - 10), 0, 1)
    np.testing.assert_allclose(freqs, base / 40 * ramp + base * (1 - ramp), rtol=1e-6)
    # High-frequency pairs (below `low`) are untouched; low-frequency ones are divided by 40.
    np.testing.assert_allclose(freqs[:10], base[:10], rtol=1e-6)
    np.testing.assert_allclose(freqs[23:], base[23:] / 40, rtol=1e-6)


def test_interleaved_rope_is_complex_rotation_of_pairs():
    cfg = MLAConfig(1, None, 8, 8, 8, 8, rope_theta=100.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    positions = jnp.array([0, 5, 17])
    cos, sin = rope.rope_cos_sin(cfg, positions)
    got = np.asarray(rope.apply_rope(jnp.asarray(x), cos, sin))
    freqs = 100.0 ** (-np.arange(0, 8, 2) / 8)
    z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * np.outer([0, 5, 17], freqs))
    np.testing.assert_allclose(got[:, 0::2], z.real, atol=1e-5)
    np.testing.assert_allclose(got[:, 1::2], z.imag, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cfg = MLAConfig(1, None, 8, 8, 8, 8, yarn=YarnConfig(4.0, 16))
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(8,)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        cq, sq = rope.rope_cos_sin(cfg, jnp.array(pq))
        ck, sk = rope.rope_cos_sin(cfg, jnp.array(pk))
        return float(rope.apply_rope(q, cq, sq) @ rope.apply_rope(k, ck, sk))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
