"""model.forward refuses token ids and positions outside the model's ranges (outside a jit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from tests.conftest import tiny_config

CFG = tiny_config(num_layers=1, num_dense_layers=1, moe=None, mtp_depth=0, max_seq_len=16)


@pytest.fixture(scope="module")
def variables():
    return model.init(CFG, jax.random.key(0))


def _tokens(*ids: int) -> np.ndarray:
    return np.array([ids], np.int32)


def test_ids_and_positions_at_the_bounds_are_valid():
    positions = np.array([[0, CFG.max_seq_len - 1]], np.int32)
    model.check_inputs(CFG, _tokens(0, CFG.vocab_size - 1), positions)
    model.check_inputs(CFG, np.zeros((2, CFG.max_seq_len), np.int32))  # default positions


@pytest.mark.parametrize("bad", [97, 1000, -1, -98])
def test_token_ids_outside_the_vocab_are_refused(variables, bad):
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, 97\).*got {bad}"):
        model.forward(CFG, variables, _tokens(1, bad, 2))


@pytest.mark.parametrize("bad", [16, -1])
def test_positions_outside_max_seq_len_are_refused(variables, bad):
    positions = np.array([[0, bad]], np.int32)
    with pytest.raises(ValueError, match=rf"positions must lie in \[0, 16\).*got {bad}"):
        model.forward(CFG, variables, _tokens(1, 2), positions=positions)


def test_sequences_longer_than_max_seq_len_are_refused_even_under_jit(variables):
    tokens = np.zeros((1, CFG.max_seq_len + 1), np.int32)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds ModelConfig\.max_seq_len 16"):
        model.forward(CFG, variables, tokens)
    forward = jax.jit(model.forward, static_argnums=0)
    with pytest.raises(ValueError, match="max_seq_len"):  # a shape: known while tracing
        forward(CFG, variables, tokens)


def test_bad_shapes_and_dtypes_are_refused(variables):
    with pytest.raises(ValueError, match="must be integer ids"):
        model.forward(CFG, variables, np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model.forward(CFG, variables, np.zeros((2,), np.int32))
    with pytest.raises(ValueError, match="positions have shape"):
        model.forward(CFG, variables, _tokens(1, 2), positions=np.zeros((1, 3), np.int32))


def test_under_jit_values_are_unchecked_as_documented(variables):
    # The forward docstring's promise: traced ids are not checked; an id >= vocab gives NaN
    # logits for its whole row (attention spreads it), so callers check with check_inputs.
    bad = _tokens(1, CFG.vocab_size, 2)
    logits = jax.jit(model.forward, static_argnums=0)(CFG, variables, jnp.asarray(bad)).logits
    assert np.isnan(logits).all()
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model.check_inputs(CFG, bad)
    model.check_inputs(CFG, _tokens(1, 2), np.array([[3, 4]]))
