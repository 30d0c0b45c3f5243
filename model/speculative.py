"""Greedy decoding with the first MTP module as a draft model (self-speculative decoding).

Each step feeds the main model two tokens, the pending token t_i and the MTP draft d for
t_{i+1}. Its argmax at position i is the true t_{i+1}; if it equals d, its argmax at i + 1 is
t_{i+2} as well, so two tokens come out of one forward pass. Then the MTP module runs on
positions i and i + 1 (main hidden state, next token) and drafts the token after the newest
one. A rejected draft is simply forgotten: both caches are rewound to the accepted length.
The output equals plain greedy decoding; V3 reports 85-90% acceptance for its MTP module.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from model import decode
from model.config import ModelConfig
from model.generate import Emitted, Generation, check_request, left_pad
from model.sampling import Sampling, sample

GREEDY = Sampling(temperature=0.0)


@struct.dataclass
class SpeculativeStats:
    """drafted: drafts that could have been accepted (not after a stop token or at the length
    limit); accepted: drafts equal to the main model's token; steps: main-model decode passes."""

    drafted: jax.Array
    accepted: jax.Array
    steps: jax.Array

    @property
    def acceptance_rate(self) -> float:
        return float(self.accepted) / max(float(self.drafted), 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def speculative_padded(
    cfg: ModelConfig,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...],
    variables: dict,
    prompts_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
) -> tuple[Generation, SpeculativeStats]:
    """The jitted core of `generate_speculative` for left-padded prompts."""
    B, P = prompts_BxP.shape
    max_len = P + max_new_tokens
    logits, hidden, cache = decode.prefill(cfg, variables, prompts_BxP, prompt_lengths_B, max_len)
    first_B, logprobs_B = sample(logits[:, -1], None, GREEDY)
    emitted = Emitted.empty(B, max_new_tokens).emit(
        first_B, logprobs_B, jnp.ones((B,), bool), stop_tokens
    )
    next_BxP = jnp.concatenate([prompts_BxP[:, 1:], first_B[:, None]], axis=1)
    mtp_logits, mtp_cache = decode.mtp_prefill(
        cfg, variables, hidden, next_BxP, prompt_lengths_B, max_len
    )
    draft_B = jnp.argmax(mtp_logits[:, -1], axis=-1).astype(jnp.int32)
    zero = jnp.int32(0)
    stats = SpeculativeStats(drafted=zero, accepted=zero, steps=zero)

    def running(carry):
        return ~jnp.all(carry[4].done)

    def step_fn(carry):
        pending_B, draft_B, cache, mtp_cache, emitted, stats = carry
        active_B = ~emitted.done
        length_B = cache.length
        logits, hidden, cache = decode.extend(
            cfg, variables, jnp.stack([pending_B, draft_B], axis=1), cache
        )
        tokens_2B, logprobs_2B = sample(logits.swapaxes(0, 1).reshape(2 * B, -1), None, GREEDY)
        (g1_B, g2_B), (lp1_B, lp2_B) = tokens_2B.reshape(2, B), logprobs_2B.reshape(2, B)
        emitted = emitted.emit(g1_B, lp1_B, active_B, stop_tokens)
        can_draft_B = ~emitted.done  # g1 did not stop the row or fill it
        accept_B = can_draft_B & (g1_B == draft_B)
        emitted = emitted.emit(g2_B, lp2_B, accept_B, stop_tokens)
        # Position i's next token is g1 either way; position i + 1's is g2 when accepted.
        mtp_logits, mtp_cache = decode.mtp_extend(
            cfg, variables, hidden, jnp.stack([g1_B, g2_B], axis=1), mtp_cache
        )
        new_length_B = jnp.where(active_B, length_B + 1 + accept_B, length_B)
        cache, mtp_cache = cache.rewind(new_length_B), mtp_cache.rewind(new_length_B)
        drafts_Bx2 = jnp.argmax(mtp_logits, axis=-1).astype(jnp.int32)
        draft_B = jnp.where(accept_B, drafts_Bx2[:, 1], drafts_Bx2[:, 0])
        pending_B = jnp.where(accept_B, g2_B, g1_B)
        stats = SpeculativeStats(
            drafted=stats.drafted + jnp.sum(can_draft_B),
            accepted=stats.accepted + jnp.sum(accept_B),
            steps=stats.steps + 1,
        )
        return pending_B, draft_B, cache, mtp_cache, emitted, stats

    carry = (first_B, draft_B, cache, mtp_cache, emitted, stats)
    *_, emitted, stats = jax.lax.while_loop(running, step_fn, carry)
    return emitted.result(), stats


def generate_speculative(
    cfg: ModelConfig,
    variables: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    pad_to: int = 16,
) -> tuple[Generation, SpeculativeStats]:
    """Greedy completions of each prompt, drafted by MTP depth 1 and verified by the model.

    The tokens equal `generate(..., temperature=0)`; the stats give the acceptance rate.
    """
    if not cfg.mtp_depth:
        raise ValueError("speculative decoding drafts with the MTP module; mtp_depth is 0")
    tokens, lengths = left_pad(prompts, pad_to)
    check_request(cfg, tokens, lengths, max_new_tokens)
    stops = tuple(sorted({int(t) for t in stop_tokens}))
    return speculative_padded(cfg, max_new_tokens, stops, variables, tokens, np.asarray(lengths))
