"""The scalar reward model's core: the head reads the last real token wherever the padding
is, and the Bradley-Terry loss with margins and centering matches its formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from rl.reward_model import (
    RewardLossConfig,
    init_params,
    last_token,
    pad_rows,
    pair_loss,
    scores,
)
from tests.conftest import tiny_config

CFG = tiny_config()


def test_last_token_finds_the_end_on_either_side():
    segments = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token(segments), [2, 4, 4, 0])


def test_padding_never_moves_the_reward():
    variables = model.init(CFG, jax.random.key(0))
    params = init_params(CFG, variables["params"], jax.random.key(1))
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in (9, 17, 5, 30)]
    score = jax.jit(lambda batch: scores(CFG, params, variables["router_bias"], batch))
    want = np.stack([score(pad_rows([r], len(r)))[0] for r in rows])  # each alone, unpadded
    for length, left in ((30, False), (47, False), (47, True)):
        got = np.asarray(score(pad_rows(rows, length, left=left)))
        np.testing.assert_allclose(got, want, atol=1e-5)
    # The read position is the last token: the same row with a different last token scores
    # differently, one with a different first token too (the head sees the whole response).
    changed = [r.copy() for r in rows]
    changed[0][-1] = (changed[0][-1] + 1) % CFG.vocab_size
    assert abs(float(score(pad_rows(changed, 30))[0]) - want[0]) > 1e-4


def test_pair_loss_is_bradley_terry_with_margin_and_centering():
    rewards = jnp.array([[2.0, 0.0], [-1.0, 1.0], [0.5, 1.5], [9.0, -9.0]])  # (chosen, rejected)
    margin = jnp.array([0.0, 0.5, 1.0, 0.0])
    weight = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last pair is padding
    loss, metrics = pair_loss(RewardLossConfig(center_weight=0.1), rewards, margin, weight)
    gap = np.array([2.0, -2.0, -1.0])
    bt = np.log1p(np.exp(-(gap - [0.0, 0.5, 1.0])))
    center = np.array([2.0, 0.0, 2.0]) ** 2
    np.testing.assert_allclose(float(loss), bt.mean() + 0.1 * center.mean(), rtol=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(1 / 3)
    unweighted, _ = pair_loss(RewardLossConfig(), rewards[:3], margin[:3])
    np.testing.assert_allclose(float(unweighted), bt.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="center_weight"):
        RewardLossConfig(center_weight=-1.0)


def test_rows_longer_than_the_length_are_refused():
    with pytest.raises(ValueError, match="row 0 has 5 tokens"):
        pad_rows([np.arange(5)], 4)
