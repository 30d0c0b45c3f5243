"""Prefill and cached decode against the full forward pass; absorbed against expanded MLA."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import decode
from model.cache import KVCache, LayerKV

B, T = 3, 14
LENGTHS = (5, 2, 1)  # ragged prompts, left-padded to 5
forward = jax.jit(model.forward, static_argnums=0)
extend = jax.jit(decode.extend, static_argnums=0, static_argnames="absorbed")
mtp_extend = jax.jit(decode.mtp_extend, static_argnums=0, static_argnames="absorbed")


@pytest.fixture
def variables(cfg):
    return model.init(cfg, jax.random.key(0))


def _sequences(cfg):
    return np.asarray(jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size))


def _left_padded(seqs):
    P = max(LENGTHS)
    prompts = np.zeros((B, P), np.int32)
    for b, n in enumerate(LENGTHS):
        prompts[b, P - n :] = seqs[b, :n]
    return jnp.asarray(prompts), jnp.asarray(LENGTHS)


def _column(seqs, offset):
    """Token `LENGTHS[b] + offset` of every row, as [B, 1]."""
    return jnp.asarray([[seqs[b, n + offset]] for b, n in enumerate(LENGTHS)])


def test_incremental_decode_equals_forward(cfg, variables):
    """Every decoded position's logits (main and MTP depth 1) equal the full pass to 1e-5."""
    seqs = _sequences(cfg)
    full = forward(cfg, variables, jnp.asarray(seqs))
    prompts, lengths = _left_padded(seqs)
    P = prompts.shape[1]
    logits, hidden, cache = decode.prefill(cfg, variables, prompts, lengths, max_len=T + 2)
    next_tokens = jnp.concatenate([prompts[:, 1:], _column(seqs, 0)], axis=1)
    mtp_logits, mtp_cache = decode.mtp_prefill(cfg, variables, hidden, next_tokens, lengths, T + 2)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(logits[b, P - n :], full.logits[b, :n], atol=1e-5)
        np.testing.assert_allclose(mtp_logits[b, P - n :], full.mtp_logits[0][b, :n], atol=1e-5)
    steps = T - max(LENGTHS) - 1
    for k in range(steps):
        logits, hidden, cache = extend(cfg, variables, _column(seqs, k), cache)
        mtp_logits, mtp_cache = mtp_extend(cfg, variables, hidden, _column(seqs, k + 1), mtp_cache)
        for b, n in enumerate(LENGTHS):
            np.testing.assert_allclose(logits[b, 0], full.logits[b, n + k], atol=1e-5)
            np.testing.assert_allclose(mtp_logits[b, 0], full.mtp_logits[0][b, n + k], atol=1e-5)
    np.testing.assert_array_equal(cache.length, max(LENGTHS) + steps)
    np.testing.assert_array_equal(cache.start, max(LENGTHS) - np.asarray(LENGTHS))


def test_multi_token_extend_equals_forward(cfg, variables):
    """Several new tokens at once (speculative verification) attend causally to each other."""
    seqs = _sequences(cfg)
    full = forward(cfg, variables, jnp.asarray(seqs))
    prompts, lengths = _left_padded(seqs)
    _, _, cache = decode.prefill(cfg, variables, prompts, lengths, max_len=T)
    chunk = jnp.concatenate([_column(seqs, k) for k in range(4)], axis=1)
    logits, _, cache = extend(cfg, variables, chunk, cache)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(logits[b], full.logits[b, n : n + 4], atol=1e-5)


def test_absorbed_equals_expanded(cfg, variables):
    seqs = _sequences(cfg)
    prompts, lengths = _left_padded(seqs)
    _, _hidden, cache = decode.prefill(cfg, variables, prompts, lengths, max_len=T)
    chunk = jnp.concatenate([_column(seqs, k) for k in range(3)], axis=1)
    absorbed, h_abs, c_abs = extend(cfg, variables, chunk, cache)
    expanded, h_exp, c_exp = extend(cfg, variables, chunk, cache, absorbed=False)
    chex.assert_trees_all_close((absorbed, h_abs, c_abs), (expanded, h_exp, c_exp), atol=1e-5)


def test_rewound_slots_are_ignored_and_overwritten(cfg, variables):
    """After a rewind, what was written past the new length has no effect on later tokens."""
    seqs = _sequences(cfg)
    prompts, lengths = _left_padded(seqs)
    _, _, cache = decode.prefill(cfg, variables, prompts, lengths, max_len=T)
    garbage = jnp.full((B, 2), 7)
    _, _, dirty = extend(cfg, variables, garbage, cache)
    dirty = dirty.rewind(cache.length)
    clean_logits, _, _ = extend(cfg, variables, _column(seqs, 0), cache)
    dirty_logits, _, _ = extend(cfg, variables, _column(seqs, 0), dirty)
    np.testing.assert_allclose(dirty_logits, clean_logits, atol=1e-6)


def test_cache_writes_per_row_and_drops_past_the_end():
    zeros = jnp.zeros((1, 2, 4, 3))
    cache = KVCache(
        layers={"s": LayerKV(zeros, zeros[..., :2])},
        start=jnp.array([0, 1]),
        length=jnp.array([1, 3]),
    )
    new = LayerKV(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 2)))
    out = cache.write({"s": new})
    np.testing.assert_array_equal(out.length, [3, 5])
    np.testing.assert_array_equal(out.layers["s"].c_kv[0, :, :, 0], [[0, 1, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(out.mask(1)[:, 0], [[1, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(out.positions(2), [[3, 4], [4, 5]])


def test_prompt_longer_than_cache_fails(cfg, variables):
    tokens = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match="prompt length 6 exceeds the cache length 4"):
        decode.prefill(cfg, variables, tokens, jnp.array([6]), max_len=4)


def test_cache_sizes_v3_671b():
    """576 cached values per token per layer (PAPER_FACTS) vs 128 heads x (192 + 128) for MHA."""
    cfg = model.presets.get("v3-671b")
    assert model.cache_bytes_per_token(cfg) == 576 * 61 * 2
    assert model.mha_cache_bytes_per_token(cfg) == 128 * (192 + 128) * 61 * 2


def test_out_of_range_inputs_fail_outside_a_jit(cfg, variables):
    prompts, lengths = _left_padded(_sequences(cfg))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\).*got 97"):
        decode.prefill(cfg, variables, prompts.at[0, -1].set(cfg.vocab_size), lengths, 8)
    # Padding takes cache slots, not positions: a cache longer than max_seq_len is fine.
    decode.prefill(cfg, variables, prompts, lengths, cfg.max_seq_len + 1)
    _, _, cache = decode.prefill(cfg, variables, prompts, lengths, 8)
    with pytest.raises(ValueError, match="got -1"):
        decode.extend(cfg, variables, jnp.full((B, 1), -1, jnp.int32), cache)
