"""Rotary position embeddings: MLA's interleaved pairs with YaRN, and the dense students'
rotate-half layout with Llama 3's frequency scaling.

MLA's pairs are (x[2i], x[2i+1]) as in DeepSeek's official code (HF reaches the same scores
with `rope_interleave=True`, which de-interleaves both q and k before rotating). Llama and
Qwen checkpoints pair x[i] with x[i + d/2] (transformers' `rotate_half`), so GQA rotates so.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import GQAConfig, MLAConfig, YarnConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """0.1 * mscale * ln(factor) + 1 (1 when the factor does not extend the context)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_range(dim: int, theta: float, yarn: YarnConfig) -> tuple[float, float]:
    def corr(rotations: float) -> float:
        return (dim * math.log(yarn.original_max_position / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low = max(math.floor(corr(yarn.beta_fast)), 0)
    high = min(math.ceil(corr(yarn.beta_slow)), dim - 1)
    return low, high


def rope_frequencies(cfg: MLAConfig) -> np.ndarray:
    """Per-pair inverse frequencies [rope_dim/2], YaRN-corrected when cfg.yarn is set."""
    dim, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.yarn is None:
        return freqs.astype(np.float32)
    low, high = _yarn_correction_range(dim, theta, cfg.yarn)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    freqs = freqs / cfg.yarn.factor * ramp + freqs * (1.0 - ramp)
    return freqs.astype(np.float32)


def rope_attention_factor(cfg: MLAConfig) -> float:
    """Scale on cos/sin; HF's YaRN ratio mscale(mscale)/mscale(mscale_all_dim), 1 for V3."""
    if cfg.yarn is None:
        return 1.0
    y = cfg.yarn
    return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)


def softmax_scale(cfg: MLAConfig) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale^2 when YaRN is on (PAPER_FACTS)."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.yarn is not None:
        m = yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim)
        scale *= m * m
    return scale


def rope_cos_sin(cfg: MLAConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [*positions.shape, rope_dim/2] in float32."""
    freqs = jnp.asarray(rope_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * freqs
    factor = rope_attention_factor(cfg)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x [..., rope_dim]; cos/sin broadcast to [..., rope_dim/2]."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def gqa_frequencies(cfg: GQAConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] of a GQA head, with Llama 3's scaling when set."""
    dim = cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = cfg.llama3_scaling
    if s is not None:
        wavelen = 2 * math.pi / freqs
        low_wavelen = s.original_max_position / s.low_freq_factor  # longer: divided by factor
        high_wavelen = s.original_max_position / s.high_freq_factor  # shorter: kept
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        between = (1 - smooth) * freqs / s.factor + smooth * freqs
        freqs = np.where(
            wavelen < high_wavelen,
            freqs,
            np.where(wavelen > low_wavelen, freqs / s.factor, between),
        )
    return freqs.astype(np.float32)


def gqa_cos_sin(cfg: GQAConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [*positions.shape, head_dim/2] in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(gqa_frequencies(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (x[i], x[i + d/2]) pairs of x [..., d]; cos/sin broadcast to [..., d/2]."""
    x32 = x.astype(jnp.float32)
    x0, x1 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).astype(x.dtype)
