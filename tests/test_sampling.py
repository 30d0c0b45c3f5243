"""Sampling filters and their statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.sampling import Sampling, sample

DRAWS = 20_000


def _draw(logits_V, s: Sampling, seed=0):
    logits_NxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (DRAWS, len(logits_V)))
    tokens, logprobs = jax.jit(sample, static_argnums=2)(logits_NxV, jax.random.key(seed), s)
    return np.asarray(tokens), np.asarray(logprobs)


def _frequencies(tokens, vocab):
    return np.bincount(tokens, minlength=vocab) / len(tokens)


def test_temperature_one_matches_softmax():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    tokens, logprobs = _draw(logits, Sampling(temperature=1.0))
    np.testing.assert_allclose(_frequencies(tokens, 4), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(logprobs, logits[tokens], atol=1e-6)


def test_temperature_sharpens_and_logprobs_use_it():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    tokens, logprobs = _draw(logits, Sampling(temperature=0.5))
    want = np.exp(2 * logits) / np.exp(2 * logits).sum()
    np.testing.assert_allclose(_frequencies(tokens, 4), want, atol=0.015)
    np.testing.assert_allclose(logprobs, np.log(want)[tokens], atol=1e-5)


def test_top_k_never_leaves_the_top_k():
    logits = np.random.default_rng(0).normal(size=50) * 0.3  # flat: all tokens plausible
    tokens, _ = _draw(logits, Sampling(temperature=1.0, top_k=5))
    top5 = set(np.argsort(logits)[-5:].tolist())
    assert set(np.unique(tokens).tolist()) == top5
    kept = np.exp(logits[sorted(top5)])
    np.testing.assert_allclose(
        _frequencies(tokens, 50)[sorted(top5)], kept / kept.sum(), atol=0.015
    )


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Mass before each token: 0, 0.5, 0.8, 0.95 -> top_p 0.7 keeps the first two.
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    tokens, logprobs = _draw(logits, Sampling(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(_frequencies(tokens, 4), [0.625, 0.375, 0, 0], atol=0.015)
    # Log-probs are of the distribution before the cut (what GRPO recomputes in training).
    np.testing.assert_allclose(logprobs, logits[tokens], atol=1e-6)


def test_greedy_and_degenerate_cuts_pick_the_argmax():
    logits = np.random.default_rng(1).normal(size=(4, 30))
    want = logits.argmax(-1)
    for s in (Sampling(0.0), Sampling(1.0, top_k=1), Sampling(1.0, top_p=1e-6)):
        tokens, _ = sample(jnp.asarray(logits), jax.random.key(0), s)
        np.testing.assert_array_equal(tokens, want)


def test_fixed_key_is_deterministic():
    logits = np.zeros(100)
    a, _ = _draw(logits, Sampling(1.0), seed=3)
    b, _ = _draw(logits, Sampling(1.0), seed=3)
    c, _ = _draw(logits, Sampling(1.0), seed=4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
    ],
)
def test_bad_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
