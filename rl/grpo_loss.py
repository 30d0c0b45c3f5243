"""The GRPO objective (DeepSeekMath's per-token form, PAPER_FACTS.md) as pure functions.

    advantages = group_advantages(rewards, group_size)         # (r - mean) / (std + eps)
    loss, metrics = grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg)

Per token: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * KL_k3, rho =
pi / pi_old, KL_k3 = pi_ref / pi - log(pi_ref / pi) - 1 (inside the loss, not the reward;
skipped entirely when beta = 0).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp


class Aggregation(enum.Enum):
    """How per-token losses become one number."""

    # DeepSeekMath / R1: mean over each output's tokens, then over outputs (the default here).
    SEQUENCE_MEAN = "sequence_mean"
    TOKEN_MEAN = "token_mean"  # DAPO: every token of the batch weighs the same
    CONSTANT = "constant"  # Dr. GRPO: token sum / (outputs x max completion length)


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """eps_low / eps_high: the clip range (DAPO raises eps_high); beta: KL weight (R1-Zero
    0.001, DeepSeekMath 0.04); adv_eps: added to the group std."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.001
    adv_eps: float = 1e-4
    aggregation: Aggregation = Aggregation.SEQUENCE_MEAN

    def __post_init__(self):
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < 1:
                raise ValueError(f"GRPOLossConfig.{name} must be in (0, 1), got {value!r}")
        if not isinstance(self.beta, int | float) or self.beta < 0:
            raise ValueError(f"GRPOLossConfig.beta must be >= 0, got {self.beta!r}")
        if not isinstance(self.adv_eps, int | float) or self.adv_eps <= 0:
            raise ValueError(f"GRPOLossConfig.adv_eps must be > 0, got {self.adv_eps!r}")
        if not isinstance(self.aggregation, Aggregation):
            raise ValueError(
                f"GRPOLossConfig.aggregation must be an Aggregation, got {self.aggregation!r}"
            )


def group_advantages(rewards_N: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
    """(r - group mean) / (group std + eps) for N = groups x group_size rewards, each group's
    samples adjacent. The std is the unbiased one (as TRL and verl compute it); a group whose
    rewards are all equal gets advantage 0. NaN rewards (samples no reward function scored)
    are left out of their group's mean and std and get advantage 0."""
    N = rewards_N.shape[0]
    if group_size < 2 or N % group_size:
        raise ValueError(f"{N} rewards do not split into groups of {group_size} (>= 2)")
    r_GxS = rewards_N.astype(jnp.float32).reshape(-1, group_size)
    valid = jnp.isfinite(r_GxS)
    count = valid.sum(axis=1, keepdims=True)
    mean = jnp.where(valid, r_GxS, 0.0).sum(axis=1, keepdims=True) / jnp.maximum(count, 1)
    centered = jnp.where(valid, r_GxS - mean, 0.0)
    std = jnp.sqrt((centered**2).sum(axis=1, keepdims=True) / jnp.maximum(count - 1, 1))
    return (centered / (std + eps)).reshape(N)


def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """The k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1, d = ref_logp - logp."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def _aggregate(per_token_NxT, mask_NxT, mode: Aggregation) -> jax.Array:
    # A row with no loss tokens (an unscored sample) is no output at all: it leaves every
    # denominator, the number of sequences as well as the number of tokens.
    # where, not a product: an unscored row may carry a NaN advantage.
    masked_NxT = jnp.where(mask_NxT > 0, per_token_NxT * mask_NxT, 0.0)
    tokens_N = mask_NxT.sum(axis=1)
    outputs = jnp.maximum((tokens_N > 0).sum(), 1)
    if mode is Aggregation.TOKEN_MEAN:
        return masked_NxT.sum() / jnp.maximum(tokens_N.sum(), 1.0)
    if mode is Aggregation.CONSTANT:
        return masked_NxT.sum() / (outputs * mask_NxT.shape[1])
    per_seq_N = masked_NxT.sum(axis=1) / jnp.maximum(tokens_N, 1.0)
    return per_seq_N.sum() / outputs


def grpo_loss(
    logp_NxT: jax.Array,
    old_logp_NxT: jax.Array,
    ref_logp_NxT: jax.Array | None,
    advantages_N: jax.Array,
    mask_NxT: jax.Array,
    cfg: GRPOLossConfig,
    *,
    scored_N: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) over N completions of T tokens; mask 1 on completion tokens.

    `scored_N` (bool, optional) marks the completions a reward function scored (for example
    `isfinite(rewards)`); the others, like rows whose mask is all 0, contribute no tokens and
    are not counted among the outputs under any aggregation.
    """
    mask = mask_NxT.astype(jnp.float32)
    if scored_N is not None:
        mask = mask * scored_N.astype(jnp.float32)[:, None]
        # A NaN advantage of an unscored row would reach the gradient through 0 * NaN.
        advantages_N = jnp.where(scored_N, advantages_N, 0.0)
    ratio = jnp.exp(logp_NxT - old_logp_NxT)
    adv = advantages_N[:, None]
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    tokens = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "clip_low": jnp.sum(((ratio < 1.0 - cfg.eps_low) & (adv < 0)) * mask) / tokens,
        "clip_high": jnp.sum(((ratio > 1.0 + cfg.eps_high) & (adv > 0)) * mask) / tokens,
    }
    if cfg.beta > 0:
        if ref_logp_NxT is None:
            raise ValueError("GRPO with beta > 0 needs the reference policy's log-probs")
        kl = k3(logp_NxT, ref_logp_NxT)
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = jnp.sum(kl * mask) / tokens
    loss = _aggregate(per_token, mask, cfg.aggregation)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
