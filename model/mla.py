"""Multi-head latent attention (DeepSeek-V2/V3), training and prefill path.

q: c_q = RMSNorm(x W_qa); q = c_q W_qb (or q = x W_q without q LoRA), each head [nope | rope].
kv: x W_kva -> [c_kv | k_pe]; c_kv = RMSNorm(c_kv); c_kv W_kvb -> per head [k_nope | v].
k_pe is one RoPE head shared by all heads. Scores use fp32 softmax.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import MLAConfig
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
    """MLA over a full sequence: x [B, T, D] -> [B, T, D]."""

    cfg: MLAConfig
    d_model: int
    norm_eps: float
    init_std: float
    dtype: str = "float32"
    param_dtype: str = "float32"

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
            return project(x_BxTxD, self._cast(self._wq))
        cq_BxTxQ = self.q_norm(project(x_BxTxD, self._cast(self._wq_a)))
        return project(cq_BxTxQ, self._cast(self._wq_b))

    def project_kv_latent(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalized latent c_kv [B, T, kv_lora] and the un-rotated shared key [B, T, rope]."""
        kv = project(x_BxTxD, self._cast(self._wkv_a))
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
    ) -> jax.Array:
        c = self.cfg
        B, T, _ = x_BxTxD.shape
        q_BxTxHxK = nn.with_logical_constraint(self.project_q(x_BxTxD), BTHK)
        q_nope, q_pe = q_BxTxHxK[..., : c.qk_nope_head_dim], q_BxTxHxK[..., c.qk_nope_head_dim :]
        c_kv_BxTxC, k_pe_BxTxR = self.project_kv_latent(x_BxTxD)
        kv_BxTxHxK = project(c_kv_BxTxC, self.wkv_b())
        kv_BxTxHxK = nn.with_logical_constraint(kv_BxTxHxK, BTHK)
        k_nope, v_BxTxHxV = (
            kv_BxTxHxK[..., : c.qk_nope_head_dim],
            kv_BxTxHxK[..., c.qk_nope_head_dim :],
        )

        cos, sin = rope_cos_sin(c, positions_BxT)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])
        k_pe_BxTxR = apply_rope(k_pe_BxTxR, cos, sin)

        scores_BxHxTxS = jnp.einsum(
            "bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32
        ) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe_BxTxR, preferred_element_type=jnp.float32)
        scores_BxHxTxS = scores_BxHxTxS * softmax_scale(c)
        mask = attention_mask(T, segment_ids_BxT, B)
        scores_BxHxTxS = jnp.where(mask, scores_BxHxTxS, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(self.dtype)
        out_BxTxHxV = jnp.einsum("bhts,bshv->bthv", probs, v_BxTxHxV)
        out_BxTxHxV = nn.with_logical_constraint(out_BxTxHxV, BTHK)
        return project(out_BxTxHxV, self.wo(), in_dims=2)
