"""Multi-head latent attention (DeepSeek-V2/V3): training, prefill and cached decode.

q: c_q = RMSNorm(x W_qa); q = c_q W_qb (or q = x W_q without q LoRA), each head [nope | rope].
kv: x W_kva -> [c_kv | k_pe]; c_kv = RMSNorm(c_kv); c_kv W_kvb -> per head [k_nope | v].
k_pe is one RoPE head shared by all heads. Scores use fp32 softmax.

Decode attends over the latent cache with the up-projection absorbed (DeepSeek's inference,
not MaxText's rebuild of per-head K/V): q_nope W_UK maps queries into the latent space, the
scores and the weighted sum run over c_kv directly, and W_UV maps the result back per head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.cache import LayerKV, Mode
from model.config import FP8Config, MLAConfig
from model.layers import RMSNorm, partitioned_normal, project
from model.rope import apply_rope, rope_cos_sin, softmax_scale

BTHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def attention_mask(T: int, segment_ids_BxT: jax.Array | None, batch: int) -> jax.Array:
    """Boolean [B, 1, T, T] mask: causal, and within one document when segment ids are given."""
    causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
    mask = jnp.broadcast_to(causal_TxT, (batch, 1, T, T))
    if segment_ids_BxT is not None:
        same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        mask = mask & same_BxTxT[:, None]
    return mask


class MLA(nn.Module):
    """MLA: x [B, T, D] -> [B, T, D], over a full sequence or new tokens over a latent cache."""

    cfg: MLAConfig
    d_model: int
    norm_eps: float
    init_std: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    mode: Mode = Mode.TRAIN
    fp8: FP8Config | None = None  # FP8 projections; scores, softmax, weighted sum stay

    def setup(self):
        c, d = self.cfg, self.d_model

        def weight(name, names, shape):
            init = partitioned_normal(self.init_std, names)
            return self.param(name, init, shape, self.param_dtype)

        if c.q_lora_rank is None:
            self._wq = weight("wq", ("embed", "heads", "kv"), (d, c.num_heads, c.qk_head_dim))
        else:
            self._wq_a = weight("wq_a", ("embed", "q_lora"), (d, c.q_lora_rank))
            self.q_norm = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, "q_lora")
            self._wq_b = weight(
                "wq_b", ("q_lora", "heads", "kv"), (c.q_lora_rank, c.num_heads, c.qk_head_dim)
            )
        self._wkv_a = weight(
            "wkv_a", ("embed", "kv_lora"), (d, c.kv_lora_rank + c.qk_rope_head_dim)
        )
        self.kv_norm = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, "kv_lora")
        self._wkv_b = weight(
            "wkv_b",
            ("kv_lora", "heads", "kv"),
            (c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim),
        )
        self._wo = weight("wo", ("heads", "kv", "embed"), (c.num_heads, c.v_head_dim, d))

    def _cast(self, w: jax.Array) -> jax.Array:
        return jnp.asarray(w, self.dtype)

    def project_q(self, x_BxTxD: jax.Array) -> jax.Array:
        """Queries [B, T, H, nope + rope] before RoPE."""
        if self.cfg.q_lora_rank is None:
            return project(x_BxTxD, self._cast(self._wq), fp8=self.fp8)
        cq_BxTxQ = self.q_norm(project(x_BxTxD, self._cast(self._wq_a), fp8=self.fp8))
        return project(cq_BxTxQ, self._cast(self._wq_b), fp8=self.fp8)

    def project_kv_latent(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalized latent c_kv [B, T, kv_lora] and the un-rotated shared key [B, T, rope]."""
        kv = project(x_BxTxD, self._cast(self._wkv_a), fp8=self.fp8)
        r = self.cfg.kv_lora_rank
        return self.kv_norm(kv[..., :r]), kv[..., r:]

    def wkv_b(self) -> jax.Array:
        """Up-projection [kv_lora, H, nope + v] from the latent to per-head [k_nope | v]."""
        return self._cast(self._wkv_b)

    def wo(self) -> jax.Array:
        """Output projection [H, v, D]."""
        return self._cast(self._wo)

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array | None = None,
        cache: LayerKV | None = None,
        cache_mask_BxTxS: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        """(output [B, T, D], latent KV of the T inputs or None in TRAIN mode).

        TRAIN / PREFILL: causal attention within the T tokens (and within segments).
        DECODE*: the T new tokens attend to the cached slots where cache_mask is true and
        causally to each other; the caller writes the returned latents into the cache.
        """
        c = self.cfg
        q_BxTxHxK = nn.with_logical_constraint(self.project_q(x_BxTxD), BTHK)
        q_nope, q_pe = q_BxTxHxK[..., : c.qk_nope_head_dim], q_BxTxHxK[..., c.qk_nope_head_dim :]
        c_kv_BxTxC, k_pe_BxTxR = self.project_kv_latent(x_BxTxD)
        cos, sin = rope_cos_sin(c, positions_BxT)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])
        new = LayerKV(c_kv=c_kv_BxTxC, k_pe=apply_rope(k_pe_BxTxR, cos, sin))
        scale = softmax_scale(c)
        if self.mode in (Mode.TRAIN, Mode.PREFILL):
            out_BxTxHxV = self._attend_sequence(q_nope, q_pe, new, segment_ids_BxT)
        elif cache is None or cache_mask_BxTxS is None:
            raise ValueError(f"MLA in {self.mode} mode needs a cache and its mask")
        elif self.mode is Mode.DECODE:
            out_BxTxHxV = absorbed_attention(
                q_nope, q_pe, cache, new, cache_mask_BxTxS, self.wkv_b(), scale
            )
        else:
            out_BxTxHxV = expanded_attention(
                q_nope, q_pe, cache, new, cache_mask_BxTxS, self.wkv_b(), scale
            )
        out_BxTxHxV = nn.with_logical_constraint(out_BxTxHxV, BTHK)
        out_BxTxD = project(out_BxTxHxV, self.wo(), in_dims=2, fp8=self.fp8)
        return out_BxTxD, None if self.mode is Mode.TRAIN else new

    def _attend_sequence(self, q_nope, q_pe, new: LayerKV, segment_ids_BxT):
        c = self.cfg
        B, T = q_nope.shape[:2]
        kv_BxTxHxK = project(new.c_kv, self.wkv_b(), fp8=self.fp8)
        kv_BxTxHxK = nn.with_logical_constraint(kv_BxTxHxK, BTHK)
        k_nope, v_BxTxHxV = (
            kv_BxTxHxK[..., : c.qk_nope_head_dim],
            kv_BxTxHxK[..., c.qk_nope_head_dim :],
        )
        scores_BxHxTxS = jnp.einsum(
            "bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32
        ) + jnp.einsum("bthr,bsr->bhts", q_pe, new.k_pe, preferred_element_type=jnp.float32)
        scores_BxHxTxS = scores_BxHxTxS * softmax_scale(c)
        mask = attention_mask(T, segment_ids_BxT, B)
        scores_BxHxTxS = jnp.where(mask, scores_BxHxTxS, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(self.dtype)
        return jnp.einsum("bhts,bshv->bthv", probs, v_BxTxHxV)


def _softmax_over_cache(
    scores_cached_BxHxTxS: jax.Array, mask_BxTxS: jax.Array, scores_new_BxHxTxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """fp32 softmax over [cached slots | new tokens]; cached slots masked, new ones causal."""
    S, T = scores_cached_BxHxTxS.shape[-1], scores_new_BxHxTxT.shape[-1]
    lowest = jnp.finfo(jnp.float32).min
    cached = jnp.where(mask_BxTxS[:, None], scores_cached_BxHxTxS, lowest)
    new = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), scores_new_BxHxTxT, lowest)
    probs = jax.nn.softmax(jnp.concatenate([cached, new], axis=-1), axis=-1)
    return probs[..., :S], probs[..., S:]


def absorbed_attention(
    q_nope_BxTxHxK: jax.Array,
    q_pe_BxTxHxR: jax.Array,
    cache: LayerKV,
    new: LayerKV,
    cache_mask_BxTxS: jax.Array,
    wkv_b_CxHxKV: jax.Array,
    scale: float,
) -> jax.Array:
    """Attention of new tokens over a latent cache, per head [B, T, H, v], never forming K/V.

    score(t, s) = (q_nope W_UK) . c_kv[s] + q_pe . k_pe[s]; out = (sum_s p c_kv[s]) W_UV.
    """
    dn = q_nope_BxTxHxK.shape[-1]
    w_uk_CxHxK, w_uv_CxHxV = wkv_b_CxHxKV[..., :dn], wkv_b_CxHxKV[..., dn:]
    q_lat_BxTxHxC = jnp.einsum("bthk,chk->bthc", q_nope_BxTxHxK, w_uk_CxHxK)
    q_lat_BxTxHxC = nn.with_logical_constraint(q_lat_BxTxHxC, BTHK)

    def scores(kv: LayerKV) -> jax.Array:
        f32 = jnp.float32
        lat = jnp.einsum("bthc,bsc->bhts", q_lat_BxTxHxC, kv.c_kv, preferred_element_type=f32)
        pe = jnp.einsum("bthr,bsr->bhts", q_pe_BxTxHxR, kv.k_pe, preferred_element_type=f32)
        return (lat + pe) * scale

    p_cached, p_new = _softmax_over_cache(scores(cache), cache_mask_BxTxS, scores(new))
    dtype = cache.c_kv.dtype
    out_BxTxHxC = jnp.einsum("bhts,bsc->bthc", p_cached.astype(dtype), cache.c_kv)
    out_BxTxHxC = out_BxTxHxC + jnp.einsum("bhts,bsc->bthc", p_new.astype(dtype), new.c_kv)
    return jnp.einsum("bthc,chv->bthv", out_BxTxHxC, w_uv_CxHxV)


def expanded_attention(
    q_nope_BxTxHxK: jax.Array,
    q_pe_BxTxHxR: jax.Array,
    cache: LayerKV,
    new: LayerKV,
    cache_mask_BxTxS: jax.Array,
    wkv_b_CxHxKV: jax.Array,
    scale: float,
) -> jax.Array:
    """The same attention with per-head K/V rebuilt from every cached latent (the reference)."""
    dn = q_nope_BxTxHxK.shape[-1]

    def scores_values(kv: LayerKV) -> tuple[jax.Array, jax.Array]:
        kv_BxSxHxK = project(kv.c_kv, wkv_b_CxHxKV)
        k_nope, v_BxSxHxV = kv_BxSxHxK[..., :dn], kv_BxSxHxK[..., dn:]
        f32 = jnp.float32
        nope = jnp.einsum("bthk,bshk->bhts", q_nope_BxTxHxK, k_nope, preferred_element_type=f32)
        pe = jnp.einsum("bthr,bsr->bhts", q_pe_BxTxHxR, kv.k_pe, preferred_element_type=f32)
        return (nope + pe) * scale, v_BxSxHxV

    s_cached, v_cached = scores_values(cache)
    s_new, v_new = scores_values(new)
    p_cached, p_new = _softmax_over_cache(s_cached, cache_mask_BxTxS, s_new)
    dtype = v_cached.dtype
    out = jnp.einsum("bhts,bshv->bthv", p_cached.astype(dtype), v_cached)
    return out + jnp.einsum("bhts,bshv->bthv", p_new.astype(dtype), v_new)
