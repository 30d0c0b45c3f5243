"""Grouped-query attention (Llama 3, Qwen2 / Qwen2.5): training, prefill and cached decode.

q = x W_q (+ b_q) [B, T, H, d]; k, v = x W_k, x W_v (+ biases) [B, T, G, d] with G = num_kv_heads
groups of H / G query heads each; RoPE rotates q and k in the rotate-half layout; fp32
softmax over q.k / sqrt(d). The cache holds the rotated k and v per KV head (`KV`): G x 2d
numbers per token per layer, against MLA's kv_lora + rope.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from model.cache import Mode
from model.config import FP8Config, GQAConfig
from model.layers import partitioned_normal, project
from model.mla import attention_mask
from model.rope import apply_rope_half, gqa_cos_sin

BTHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


@struct.dataclass
class KV:
    """Cached keys (rotated) and values of one layer (or a stack: a leading layer axis):
    k, v [.., B, S, num_kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def grouped_attention(
    q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask_BxTxS: jax.Array
) -> jax.Array:
    """softmax(q.k / sqrt(d)) v per query head [B, T, H, d], each group of H / G query heads
    reading its own KV head; `mask` says which slots each query may attend to."""
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxSxGxK.shape[2]
    q = q_BxTxHxK.reshape(B, T, G, H // G, K)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BxTxS[:, None, None], scores * K**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
    return out.reshape(B, T, H, K)


class GQA(nn.Module):
    """GQA: x [B, T, D] -> [B, T, D], over a full sequence or new tokens over a KV cache.

    Same call signature as model.mla.MLA, so a block takes either."""

    cfg: GQAConfig
    d_model: int
    init_std: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    mode: Mode = Mode.TRAIN
    fp8: FP8Config | None = None  # FP8 projections; scores, softmax, weighted sum stay

    def _project(self, x, name: str, heads: int, head_axis: str) -> jax.Array:
        c = self.cfg
        init = partitioned_normal(self.init_std, ("embed", head_axis, "kv"))
        w = self.param(name, init, (self.d_model, heads, c.head_dim), self.param_dtype)
        y = project(x, jnp.asarray(w, self.dtype), fp8=self.fp8)
        if c.qkv_bias:
            init_b = nn.with_logical_partitioning(nn.initializers.zeros_init(), (head_axis, "kv"))
            b = self.param(f"b{name[1:]}", init_b, (heads, c.head_dim), self.param_dtype)
            y = y + jnp.asarray(b, self.dtype)
        return y

    @nn.compact
    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array | None = None,
        cache: KV | None = None,
        cache_mask_BxTxS: jax.Array | None = None,
    ) -> tuple[jax.Array, KV | None]:
        """(output [B, T, D], the T inputs' KV or None in TRAIN mode).

        TRAIN / PREFILL: causal attention within the T tokens (and within segments).
        DECODE*: the T new tokens attend to the cached slots where cache_mask is true and
        causally to each other; the caller writes the returned KV into the cache.
        """
        c = self.cfg
        x_BxTxD = x_BxTxD.astype(self.dtype)
        q = self._project(x_BxTxD, "wq", c.num_heads, "heads")
        k = self._project(x_BxTxD, "wk", c.num_kv_heads, "kv_heads")
        v = self._project(x_BxTxD, "wv", c.num_kv_heads, "kv_heads")
        cos, sin = gqa_cos_sin(c, positions_BxT)
        q = nn.with_logical_constraint(apply_rope_half(q, cos[:, :, None], sin[:, :, None]), BTHK)
        new = KV(k=apply_rope_half(k, cos[:, :, None], sin[:, :, None]), v=v)
        B, T = x_BxTxD.shape[:2]
        if self.mode in (Mode.TRAIN, Mode.PREFILL):
            mask = attention_mask(T, segment_ids_BxT, B)[:, 0]
            out = grouped_attention(q, new.k, new.v, mask)
        elif cache is None or cache_mask_BxTxS is None:
            raise ValueError(f"GQA in {self.mode} mode needs a cache and its mask")
        else:  # DECODE and DECODE_EXPANDED are one path: there is nothing to absorb
            causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
            keys = jnp.concatenate([cache.k, new.k.astype(cache.k.dtype)], axis=1)
            values = jnp.concatenate([cache.v, new.v.astype(cache.v.dtype)], axis=1)
            mask = jnp.concatenate([cache_mask_BxTxS, causal], axis=-1)
            out = grouped_attention(q, keys, values, mask)
        out = nn.with_logical_constraint(out, BTHK)
        init_o = partitioned_normal(self.init_std, ("heads", "kv", "embed"))
        wo = self.param("wo", init_o, (c.num_heads, c.head_dim, self.d_model), self.param_dtype)
        out_BxTxD = project(out, jnp.asarray(wo, self.dtype), in_dims=2, fp8=self.fp8)
        return out_BxTxD, None if self.mode is Mode.TRAIN else new
