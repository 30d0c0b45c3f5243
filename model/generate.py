"""Batched generation over the latent KV cache: prompts of any lengths, G samples each.

    out = model.generate(cfg, variables, [[1, 5, 9], [1, 7]], max_new_tokens=64,
                         temperature=0.7, top_p=0.95, num_samples=4, rng=key)
    out.completions()  # 8 lists of token ids, prompt-major (prompt 0's 4 samples first)

The decode loop is one jitted `lax.while_loop` that stops as soon as every row has finished.
Rows are left-padded to a common prompt length (rounded up to `pad_to` so that calls with
similar prompts reuse one compilation); a row's tokens and log-probs do not depend on the
other rows in its batch.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from model import decode
from model.config import ModelConfig
from model.sampling import Sampling, sample


class FinishReason(enum.IntEnum):
    STOP = 0  # produced a stop token (kept as the row's last token)
    LENGTH = 1  # reached max_new_tokens


@struct.dataclass
class Generation:
    """tokens [N, max_new] int32 (0 after a row's end); lengths [N] (stop token included);
    logprobs [N, max_new] float32 of each generated token (0 after the end, see
    model.sampling); finish_reason [N] (FinishReason values). Rows are prompt-major."""

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    finish_reason: jax.Array

    def completions(self) -> list[list[int]]:
        """Each row's generated token ids, cut at its length (on the host)."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        return [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)]


@struct.dataclass
class Emitted:
    """Tokens written so far: tokens/logprobs [B, N], count [B], stopped [B] (by a stop token)."""

    tokens: jax.Array
    logprobs: jax.Array
    count: jax.Array
    stopped: jax.Array

    @classmethod
    def empty(cls, batch: int, max_new: int) -> Emitted:
        return cls(
            tokens=jnp.zeros((batch, max_new), jnp.int32),
            logprobs=jnp.zeros((batch, max_new), jnp.float32),
            count=jnp.zeros((batch,), jnp.int32),
            stopped=jnp.zeros((batch,), bool),
        )

    @property
    def done(self) -> jax.Array:
        return self.stopped | (self.count >= self.tokens.shape[1])

    def emit(self, tokens_B, logprobs_B, write_B, stop_tokens: tuple[int, ...]) -> Emitted:
        """Append one token to each row where write_B (and the row is not done)."""
        write_B = write_B & ~self.done
        B, N = self.tokens.shape
        rows, slots = jnp.arange(B), jnp.where(write_B, self.count, N)  # N: dropped
        stop_B = jnp.isin(tokens_B, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else False
        return Emitted(
            tokens=self.tokens.at[rows, slots].set(tokens_B, mode="drop"),
            logprobs=self.logprobs.at[rows, slots].set(logprobs_B, mode="drop"),
            count=self.count + write_B,
            stopped=self.stopped | (write_B & stop_B),
        )

    def result(self) -> Generation:
        reason = jnp.where(self.stopped, FinishReason.STOP, FinishReason.LENGTH)
        return Generation(self.tokens, self.count, self.logprobs, reason.astype(jnp.int32))


def left_pad(prompts: Sequence[Sequence[int]], pad_to: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> (tokens [B, P] left-padded with 0, lengths [B]); P a multiple of pad_to."""
    if len(prompts) == 0:
        raise ValueError("generate: no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError(
            f"generate: prompt {int(lengths.argmin())} is empty; give at least one token"
        )
    P = -(-int(lengths.max()) // pad_to) * pad_to
    tokens = np.zeros((len(prompts), P), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt) :] = prompt
    return tokens, lengths


def check_request(cfg: ModelConfig, tokens: np.ndarray, lengths, max_new_tokens: int) -> None:
    """Clear errors for requests the model cannot serve."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(
            f"prompt token ids must lie in [0, {cfg.vocab_size}) (ModelConfig.vocab_size), "
            f"got {low if low < 0 else high}"
        )
    longest = int(np.max(lengths)) + max_new_tokens
    if longest > cfg.max_seq_len:
        raise ValueError(
            f"longest prompt + max_new_tokens = {longest} exceeds the model's max_seq_len "
            f"{cfg.max_seq_len}"
        )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), static_argnames="absorbed")
def generate_padded(
    cfg: ModelConfig,
    sampling: Sampling,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...],
    variables: dict,
    prompts_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
    rng: jax.Array,
    *,
    absorbed: bool = True,
) -> Generation:
    """The jitted core of `generate` for left-padded prompts (one row per sample).

    absorbed=False decodes with per-head K/V rebuilt from the cache (benchmarks, tests).
    """
    B, P = prompts_BxP.shape
    logits, _, cache = decode.prefill(
        cfg, variables, prompts_BxP, prompt_lengths_B, P + max_new_tokens
    )
    tokens_B, logprobs_B = sample(logits[:, -1], jax.random.fold_in(rng, 0), sampling)
    everyone = jnp.ones((B,), bool)
    emitted = Emitted.empty(B, max_new_tokens).emit(tokens_B, logprobs_B, everyone, stop_tokens)

    def running(carry):
        _, _, emitted, step = carry
        return (step < max_new_tokens) & ~jnp.all(emitted.done)

    def step_fn(carry):
        last_B, cache, emitted, step = carry
        logits, _, cache = decode.extend(cfg, variables, last_B[:, None], cache, absorbed=absorbed)
        tokens_B, logprobs_B = sample(logits[:, 0], jax.random.fold_in(rng, step), sampling)
        emitted = emitted.emit(tokens_B, logprobs_B, everyone, stop_tokens)
        return tokens_B, cache, emitted, step + 1

    carry = (tokens_B, cache, emitted, jnp.int32(1))
    _, _, emitted, _ = jax.lax.while_loop(running, step_fn, carry)
    return emitted.result()


def generate(
    cfg: ModelConfig,
    variables: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    stop_tokens: Sequence[int] = (),
    num_samples: int = 1,
    rng: jax.Array | None = None,
    pad_to: int = 16,
) -> Generation:
    """Sample num_samples completions of each prompt (token id lists); temperature 0 is greedy.

    Deterministic for a fixed rng. Returns a Generation with len(prompts) * num_samples rows,
    the samples of each prompt next to each other.
    """
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if rng is None:
        if not sampling.greedy:
            raise ValueError("generate: sampling with temperature > 0 needs an rng key")
        rng = jax.random.key(0)
    tokens, lengths = left_pad(prompts, pad_to)
    check_request(cfg, tokens, lengths, max_new_tokens)
    tokens, lengths = np.repeat(tokens, num_samples, axis=0), np.repeat(lengths, num_samples)
    stops = tuple(sorted({int(t) for t in stop_tokens}))
    return generate_padded(cfg, sampling, max_new_tokens, stops, variables, tokens, lengths, rng)
