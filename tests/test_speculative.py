"""MTP self-speculative decoding gives exactly the greedy tokens, whatever the acceptance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import model
from model import FinishReason

PROMPTS = [[3, 14, 15, 92, 65, 35], [2, 71], [82, 81, 82, 84, 59, 4, 52, 35, 36]]


@pytest.fixture
def variables(cfg):
    return model.init(cfg, jax.random.key(0))


def _bigram(cfg, variables):
    """Weights under which the next token depends only on the current one and the MTP module
    predicts exactly what the main model will: every attention and FFN output projection is
    zero, MTP's hnorm drops the hidden state and eh_proj passes the embedding through. Greedy
    decoding then walks a random bigram chain and every draft should be accepted."""
    flat = traverse_util.flatten_dict(variables["params"])
    for path, leaf in flat.items():
        if path[-1] == "wo" or path[:2] == ("mtp", "hnorm"):
            flat[path] = jnp.zeros_like(leaf)
        elif path[:2] == ("mtp", "eh_proj"):
            D = cfg.d_model
            eye = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))])
            flat[path] = jnp.broadcast_to(eye, leaf.shape)
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


def _both(cfg, variables, **kwargs):
    greedy = model.generate(cfg, variables, PROMPTS, temperature=0, **kwargs)
    spec, stats = model.generate_speculative(cfg, variables, PROMPTS, **kwargs)
    return greedy, spec, stats


def _assert_same(greedy, spec):
    assert spec.completions() == greedy.completions()
    np.testing.assert_array_equal(spec.finish_reason, greedy.finish_reason)
    np.testing.assert_allclose(spec.logprobs, greedy.logprobs, atol=1e-5)


@pytest.mark.parametrize("new", [9, 10])  # an odd and an even budget
def test_equals_greedy_with_random_weights(cfg, variables, new):
    greedy, spec, stats = _both(cfg, variables, max_new_tokens=new)
    _assert_same(greedy, spec)
    assert 0 <= int(stats.accepted) <= int(stats.drafted)


def test_all_drafts_accepted_when_mtp_is_exact(cfg, variables):
    new = 11
    bigram = _bigram(cfg, variables)
    greedy, spec, stats = _both(cfg, bigram, max_new_tokens=new)
    _assert_same(greedy, spec)
    assert len({t for c in greedy.completions() for t in c}) > 3  # a real chain, not one token
    assert stats.acceptance_rate == 1.0
    # One token from prefill, then two per step: (new - 1) / 2 steps.
    assert int(stats.steps) == (new - 1 + 1) // 2


def test_stop_tokens(cfg, variables):
    bigram = _bigram(cfg, variables)
    reference = model.generate(cfg, bigram, PROMPTS, max_new_tokens=12, temperature=0)
    # Stop inside an accepted pair on one row and at a pair's first token on another.
    stops = [reference.completions()[0][3], reference.completions()[1][4]]
    greedy, spec, _ = _both(cfg, bigram, max_new_tokens=12, stop_tokens=stops)
    _assert_same(greedy, spec)
    assert greedy.finish_reason[0] == FinishReason.STOP


def test_needs_an_mtp_module(cfg, variables):
    no_mtp = cfg.replace(mtp_depth=0)
    params = {k: v for k, v in variables["params"].items() if k != "mtp"}
    with pytest.raises(ValueError, match="mtp_depth is 0"):
        model.generate_speculative(no_mtp, {"params": params}, PROMPTS, max_new_tokens=4)
