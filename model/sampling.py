"""Token sampling: greedy, temperature, top-k and top-p (nucleus), with log-probs.

Filters apply in the order Hugging Face and vLLM use: temperature, then top-k, then top-p.
The returned log-prob is that of the sampled token under the temperature-scaled distribution
before the top-k / top-p cut (raw logits when greedy), which is what TRL and verl feed GRPO
as the rollout policy's log-probs; a training forward pass can recompute it exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k None and top_p 1.0 mean no cut."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k <= 0
        ):
            raise ValueError(f"Sampling.top_k must be a positive int or None, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _top_k(logits_BxV: jax.Array, k: int) -> jax.Array:
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)


def _top_p(logits_BxV: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # The most likely token is always kept (its mass before is 0 < p).
    kept_BxV = jnp.where(mass_before_BxV < p, sorted_BxV, jnp.inf)
    threshold_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def sample(logits_BxV: jax.Array, rng: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """(tokens [B] int32, their log-probs [B] float32) from float logits [B, V]."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if s.greedy:
        tokens_B = jnp.argmax(logits_BxV, axis=-1)
        scaled_BxV = logits_BxV
    else:
        scaled_BxV = logits_BxV / s.temperature
        cut_BxV = scaled_BxV
        if s.top_k is not None and s.top_k < logits_BxV.shape[-1]:
            cut_BxV = _top_k(cut_BxV, s.top_k)
        if s.top_p < 1.0:
            cut_BxV = _top_p(cut_BxV, s.top_p)
        tokens_B = jax.random.categorical(rng, cut_BxV, axis=-1)
    logprobs_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    logprobs_B = jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B.astype(jnp.int32), logprobs_B
