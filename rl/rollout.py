"""Rollouts for GRPO: G sampled completions per prompt through `model.generate`,
laid out as fixed-shape training rows, and the policy's per-token log-probs on those rows.

A row is [prompt | completion | padding] of a fixed length, so every step of a run reuses one
compilation. Positions start at 0 on the prompt's first token, as in the rollout (which
left-pads prompts and gives each row its own RoPE positions), so the training forward pass
sees exactly what the sampler saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig, forward
from model.generate import FinishReason, generate
from model.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class Rollout:
    """N = prompts x G rows, prompt-major. tokens [N, L] (prompt, completion, then 0s);
    mask [N, L - 1]: 1 where the target tokens[:, j + 1] is a completion token; sampler_logp
    [N, L - 1]: the sampler's log-prob of that target (0 elsewhere); completions: token ids
    (stop token included); truncated [N]: hit max_new_tokens without a stop token."""

    tokens: np.ndarray
    mask: np.ndarray
    sampler_logp: np.ndarray
    completions: list[list[int]]
    truncated: np.ndarray

    @property
    def completion_lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.completions], np.int32)


def row_length(longest_prompt: int, max_new_tokens: int, multiple: int = 16) -> int:
    """Training row length for prompts up to `longest_prompt` tokens (rounded up so that
    similar task sets share a compilation)."""
    return -(-(longest_prompt + max_new_tokens) // multiple) * multiple


def rollout(
    cfg: ModelConfig,
    variables: dict,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    sampling: Sampling,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    rng: jax.Array,
    row_len: int,
    pad_to: int = 16,
) -> Rollout:
    """Sample group_size completions of each prompt and lay them out as training rows."""
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > row_len:
        raise ValueError(
            f"row_len {row_len} < longest prompt {longest} + max_new_tokens {max_new_tokens}"
        )
    out = generate(
        cfg, variables, prompts, max_new_tokens=max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        stop_tokens=stop_tokens, num_samples=group_size, rng=rng, pad_to=pad_to,
    )  # fmt: skip
    gen_tokens, gen_len = np.asarray(out.tokens), np.asarray(out.lengths)
    gen_logp = np.asarray(out.logprobs)
    N = len(gen_tokens)
    rows = np.zeros((N, row_len), np.int32)
    mask = np.zeros((N, row_len - 1), np.float32)
    sampler_logp = np.zeros((N, row_len - 1), np.float32)
    completions = []
    for i in range(N):
        prompt = prompts[i // group_size]
        P, C = len(prompt), int(gen_len[i])
        rows[i, :P] = prompt
        rows[i, P : P + C] = gen_tokens[i, :C]
        # Target j + 1 is completion token k = j + 1 - P.
        mask[i, P - 1 : P - 1 + C] = 1.0
        sampler_logp[i, P - 1 : P - 1 + C] = gen_logp[i, :C]
        completions.append(gen_tokens[i, :C].tolist())
    truncated = np.asarray(out.finish_reason) == int(FinishReason.LENGTH)
    return Rollout(rows, mask, sampler_logp, completions, truncated)


def token_logprobs(
    cfg: ModelConfig, variables: dict, tokens_NxL: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """(log-prob of each next token, entropy of each next-token distribution), both
    [N, L - 1], under the policy's logits / temperature (the sampler's distribution before
    top-p / top-k). MTP modules are not run: RL trains the main model."""
    out = forward(cfg.replace(mtp_depth=0), variables, tokens_NxL[:, :-1])
    logits = out.logits.astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens_NxL[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy
