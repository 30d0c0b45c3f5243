"""DeepSeek-V3 routing: sigmoid scores, bias-corrected group-limited top-k, balance loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import MoEConfig


def route(scores_NxE: jax.Array, bias_E: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """Choose top-k experts per token; returns (expert ids [N, K] int32, weights [N, K] f32).

    The correction bias only steers selection; the weights come from the unbiased sigmoid
    scores of the chosen experts, normalized to sum 1, times routed_scaling_factor.
    """
    N, E = scores_NxE.shape
    biased_NxE = scores_NxE + bias_E
    if cfg.num_groups > 1:
        per_group = E // cfg.num_groups
        grouped_NxGxP = biased_NxE.reshape(N, cfg.num_groups, per_group)
        group_scores_NxG = jax.lax.top_k(grouped_NxGxP, 2)[0].sum(-1)
        _, top_groups_NxT = jax.lax.top_k(group_scores_NxG, cfg.top_groups)
        keep_NxG = jax.nn.one_hot(top_groups_NxT, cfg.num_groups, dtype=bool).any(axis=1)
        keep_NxE = jnp.repeat(keep_NxG, per_group, axis=1)
        # Official code masks dropped groups with -inf (HF once used 0.0; they differ only
        # when a biased score is negative); we follow the official code.
        biased_NxE = jnp.where(keep_NxE, biased_NxE, -jnp.inf)
    _, experts_NxK = jax.lax.top_k(biased_NxE, cfg.top_k)
    weights_NxK = jnp.take_along_axis(scores_NxE, experts_NxK, axis=-1)
    if cfg.norm_topk_prob:
        # Official code divides by the plain sum (HF adds 1e-20); sigmoid scores are > 0.
        weights_NxK = weights_NxK / weights_NxK.sum(-1, keepdims=True)
    return experts_NxK.astype(jnp.int32), weights_NxK * cfg.routed_scaling_factor


def expert_counts(experts_NxK: jax.Array, num_experts: int) -> jax.Array:
    """Number of routed token copies per expert [E] (int32)."""
    return jnp.bincount(experts_NxK.reshape(-1), length=num_experts).astype(jnp.int32)


def sequence_balance_loss(
    scores_BxTxE: jax.Array, experts_BxTxK: jax.Array, top_k: int
) -> jax.Array:
    """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    f_i = E / (K T) * (#tokens of the sequence routed to i); P_i = mean over the sequence's
    tokens of s_i / sum_j s_j. The caller multiplies by alpha.
    """
    _, T, E = scores_BxTxE.shape
    routed_BxE = jax.nn.one_hot(experts_BxTxK, E, dtype=jnp.float32).sum(axis=(1, 2))
    f_BxE = jax.lax.stop_gradient(routed_BxE * E / (top_k * T))
    p_BxE = (scores_BxTxE / scores_BxTxE.sum(-1, keepdims=True)).mean(axis=1)
    return (f_BxE * p_BxE).sum(-1).mean()
