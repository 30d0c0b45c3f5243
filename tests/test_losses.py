"""The hand-written cross-entropy VJP equals autodiff of the textbook formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.losses import cross_entropy


def test_cross_entropy_values_and_gradients_match_optax():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 11)) * 4
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    weights = jax.random.uniform(jax.random.key(2), (3, 5))
    ref = lambda x: (optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights).sum()
    ours = lambda x: (cross_entropy(x, targets) * weights).sum()
    np.testing.assert_allclose(ours(logits), ref(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(logits), jax.grad(ref)(logits), atol=1e-6)


def test_cross_entropy_is_stable_for_large_logits():
    logits = jnp.array([[1e4, 0.0, -1e4]])
    np.testing.assert_allclose(cross_entropy(logits, jnp.array([1])), [1e4], rtol=1e-6)
    assert np.isfinite(
        np.asarray(jax.grad(lambda x: cross_entropy(x, jnp.array([1])).sum())(logits))
    ).all()
