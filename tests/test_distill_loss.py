"""The distillation divergences against plain numpy: forward and reverse KL, the generalised JSD
and its limits at both ends, temperature scaling, the top-k form (renormalised over the
teacher's k tokens), and the forward KL's gradient p_student - p_teacher."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.distill_loss import teacher_topk, token_divergence, topk_divergence

V = 11
RNG = np.random.default_rng(0)
S_LOGITS = jnp.asarray(RNG.standard_normal((2, 3, V)) * 2, jnp.float32)
T_LOGITS = jnp.asarray(RNG.standard_normal((2, 3, V)) * 2, jnp.float32)


def _p(logits, tau=1.0):
    z = np.asarray(logits, np.float64) / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def _jsd(p_t, p_s, beta):
    m = beta * p_t + (1 - beta) * p_s
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def test_forward_reverse_and_jsd_match_numpy():
    p_s, p_t = _p(S_LOGITS), _p(T_LOGITS)
    np.testing.assert_allclose(token_divergence(S_LOGITS, T_LOGITS, 0.0), _kl(p_t, p_s), rtol=1e-5)
    np.testing.assert_allclose(token_divergence(S_LOGITS, T_LOGITS, 1.0), _kl(p_s, p_t), rtol=1e-5)
    for beta in (0.1, 0.5, 0.9):
        got = token_divergence(S_LOGITS, T_LOGITS, beta)
        np.testing.assert_allclose(got, _jsd(p_t, p_s, beta), rtol=1e-4)
    # At 0.5 the JSD is symmetric; every divergence is 0 between equal distributions.
    np.testing.assert_allclose(
        token_divergence(S_LOGITS, T_LOGITS, 0.5), token_divergence(T_LOGITS, S_LOGITS, 0.5),
        rtol=1e-5,
    )  # fmt: skip
    for beta in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(token_divergence(S_LOGITS, S_LOGITS, beta), 0.0, atol=1e-6)


def test_the_jsd_tends_to_forward_and_reverse_kl_at_its_ends():
    p_s, p_t = _p(S_LOGITS), _p(T_LOGITS)
    small = 1e-3
    near_forward = np.asarray(token_divergence(S_LOGITS, T_LOGITS, small)) / small
    near_reverse = np.asarray(token_divergence(S_LOGITS, T_LOGITS, 1 - small)) / small
    np.testing.assert_allclose(near_forward, _kl(p_t, p_s), rtol=0.05)
    np.testing.assert_allclose(near_reverse, _kl(p_s, p_t), rtol=0.05)


def test_temperature_softens_both_sides_and_scales_by_its_square():
    tau = 2.5
    for beta in (0.0, 0.5, 1.0):
        got = token_divergence(S_LOGITS, T_LOGITS, beta, temperature=tau)
        want = tau**2 * token_divergence(S_LOGITS / tau, T_LOGITS / tau, beta)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_divergence(S_LOGITS, T_LOGITS, 0.0, temperature=0.0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        token_divergence(S_LOGITS, T_LOGITS, 1.5)
    with pytest.raises(ValueError, match="same vocabulary"):
        token_divergence(S_LOGITS, T_LOGITS[..., :5], 0.0)


def test_topk_renormalises_both_sides_over_the_teachers_tokens():
    ids, logp = teacher_topk(T_LOGITS, 4)
    order = np.argsort(-np.asarray(T_LOGITS), -1)[..., :4]
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(order, -1))
    np.testing.assert_allclose(np.exp(logp), np.take_along_axis(_p(T_LOGITS), order, -1), rtol=1e-5)
    tau = 1.5
    for beta in (0.0, 0.4, 1.0):
        got = topk_divergence(S_LOGITS, ids, logp, beta, temperature=tau)
        kept_s = np.take_along_axis(np.asarray(S_LOGITS), np.asarray(ids), -1)
        kept_t = np.take_along_axis(np.asarray(T_LOGITS), np.asarray(ids), -1)
        p_s, p_t = _p(kept_s, tau), _p(kept_t, tau)
        want = _kl(p_t, p_s) if beta == 0 else _kl(p_s, p_t) if beta == 1 else _jsd(p_t, p_s, beta)
        np.testing.assert_allclose(got, tau**2 * want, rtol=1e-4)
    # With every token kept, the top-k form is the full divergence.
    ids, logp = teacher_topk(T_LOGITS, V)
    np.testing.assert_allclose(
        topk_divergence(S_LOGITS, ids, logp, 0.0), token_divergence(S_LOGITS, T_LOGITS, 0.0),
        rtol=1e-5,
    )  # fmt: skip


def test_forward_kl_gradient_is_student_minus_teacher_probabilities():
    grad = jax.grad(lambda s: token_divergence(s, T_LOGITS, 0.0).sum())(S_LOGITS)
    np.testing.assert_allclose(grad, _p(S_LOGITS) - _p(T_LOGITS), atol=1e-6)
    # The teacher gets no gradient through the reverse KL the student minimises on its samples.
    t_grad = jax.grad(lambda t: token_divergence(S_LOGITS, jax.lax.stop_gradient(t), 1.0).sum())
    np.testing.assert_array_equal(t_grad(T_LOGITS), 0.0)
    assert jnp.isfinite(token_divergence(S_LOGITS, T_LOGITS.at[..., 0].set(-1e9), 1.0)).all()
