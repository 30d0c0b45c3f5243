"""Token cross-entropy with a hand-written VJP.

Autodiff of `logsumexp(logits) - logits[target]` makes several passes over the [tokens, vocab]
logits in the backward (on a 2-core CPU it cost ~2x the head matmul's own backward); here the
forward keeps the softmax it already computed and the backward is one fused pass,
softmax - onehot(target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position -log softmax(logits)[target]; logits [..., V] float, targets [...] int."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def _forward(logits, targets):
    logits = logits.astype(jnp.float32)
    peak = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    exp = jnp.exp(logits - peak)
    total = exp.sum(-1, keepdims=True)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    loss = (peak + jnp.log(total) - picked)[..., 0]
    return loss, (exp / total, targets)


def _backward(residuals, g):
    probs, targets = residuals
    onehot = jax.nn.one_hot(targets, probs.shape[-1], dtype=probs.dtype)
    return g[..., None] * (probs - onehot), None


cross_entropy.defvjp(_forward, _backward)
