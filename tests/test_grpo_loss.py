"""The GRPO loss against a hand-written NumPy computation; advantages; the k3 KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.grpo_loss import Aggregation, GRPOLossConfig, group_advantages, grpo_loss, k3

RNG = np.random.default_rng(0)
N, T = 4, 5
LOGP = RNG.normal(-1.0, 0.3, (N, T))
OLD = LOGP + RNG.normal(0, 0.3, (N, T))  # ratios spread past the clip range
REF = LOGP + RNG.normal(0, 0.2, (N, T))
ADV = np.array([1.5, -0.5, 0.0, -1.0])
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], float)


def _numpy_loss(mode: str, beta: float, eps_low=0.2, eps_high=0.3, outputs=range(N)) -> float:
    """Token by token, with loops, as the formula reads, over the given outputs only."""
    rows = []
    for i in outputs:
        terms = []
        for t in range(T):
            if not MASK[i, t]:
                continue
            rho = np.exp(LOGP[i, t] - OLD[i, t])
            surrogate = min(rho * ADV[i], np.clip(rho, 1 - eps_low, 1 + eps_high) * ADV[i])
            d = REF[i, t] - LOGP[i, t]
            terms.append(-surrogate + beta * (np.exp(d) - d - 1))
        rows.append(terms)
    if mode == "sequence_mean":
        return float(np.mean([np.mean(r) for r in rows]))
    if mode == "token_mean":
        return float(sum(map(sum, rows)) / sum(map(len, rows)))
    return float(sum(map(sum, rows)) / (len(rows) * T))


@pytest.mark.parametrize("mode", [a.value for a in Aggregation])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_numpy(mode, beta):
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.3, beta=beta, aggregation=Aggregation(mode))
    ref = jnp.asarray(REF) if beta else None
    loss, metrics = grpo_loss(
        jnp.asarray(LOGP), jnp.asarray(OLD), ref, jnp.asarray(ADV), jnp.asarray(MASK), cfg
    )
    assert float(loss) == pytest.approx(_numpy_loss(mode, beta), rel=1e-5)
    assert ("kl" in metrics) == (beta > 0)


@pytest.mark.parametrize("mode", list(Aggregation))
def test_unscored_rows_leave_every_denominator(mode):
    # Rows 1 and 3 got no reward (NaN): they must weigh as if they were not in the batch,
    # neither through their tokens nor as outputs counted in the mean over sequences.
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.3, beta=0.04, aggregation=mode)
    scored = np.array([True, False, True, False])
    adv = jnp.asarray(np.where(scored, ADV, np.nan))
    args = (jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(REF))
    want = _numpy_loss(mode.value, 0.04, outputs=[0, 2])
    loss, _ = grpo_loss(*args, adv, jnp.asarray(MASK), cfg, scored_N=jnp.asarray(scored))
    assert float(loss) == pytest.approx(want, rel=1e-5)
    # The same when the caller zeroes their masks instead (as the GRPO step does).
    zeroed = jnp.asarray(MASK * scored[:, None])
    loss, _ = grpo_loss(*args, jnp.asarray(ADV), zeroed, cfg)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    grad = jax.grad(
        lambda lp: grpo_loss(lp, *args[1:], adv, jnp.asarray(MASK), cfg, scored_N=scored)[0]
    )(args[0])
    assert np.isfinite(np.asarray(grad)).all() and np.all(np.asarray(grad)[~scored] == 0)


def test_clip_fractions():
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.3, beta=0.0)
    _, m = grpo_loss(*map(jnp.asarray, (LOGP, OLD)), None, jnp.asarray(ADV), jnp.asarray(MASK), cfg)
    rho = np.exp(LOGP - OLD)
    low = ((rho < 0.8) & (ADV[:, None] < 0) & (MASK > 0)).sum() / MASK.sum()
    high = ((rho > 1.3) & (ADV[:, None] > 0) & (MASK > 0)).sum() / MASK.sum()
    assert float(m["clip_low"]) == pytest.approx(low) and float(m["clip_high"]) == pytest.approx(
        high
    )
    assert low + high > 0  # the example does exercise clipping


def test_gradient_vanishes_where_clipped_and_masked():
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.3, beta=0.0, aggregation=Aggregation.TOKEN_MEAN)

    def f(logp):
        return grpo_loss(logp, jnp.asarray(OLD), None, jnp.asarray(ADV), jnp.asarray(MASK), cfg)[0]

    g = np.asarray(jax.grad(f)(jnp.asarray(LOGP)))
    rho = np.exp(LOGP - OLD)
    a = ADV[:, None]
    clipped = ((rho > 1.3) & (a > 0)) | ((rho < 0.8) & (a < 0))
    assert np.all(g[MASK == 0] == 0) and np.all(g[clipped] == 0) and np.all(g[2] == 0)
    live = (MASK > 0) & ~clipped & (a != 0)
    np.testing.assert_allclose(g[live], (-rho * a / MASK.sum())[live], rtol=1e-5)


def test_k3_value_and_gradient():
    logp, ref = jnp.asarray([-1.0, -2.0, -0.5]), jnp.asarray([-1.0, -1.5, -0.9])
    d = np.asarray(ref - logp)
    np.testing.assert_allclose(k3(logp, ref), np.exp(d) - d - 1, rtol=1e-5)
    assert float(k3(logp, ref)[0]) == 0.0 and np.all(np.asarray(k3(logp, ref)) >= 0)
    grad = jax.grad(lambda lp: k3(lp, ref).sum())(logp)
    np.testing.assert_allclose(grad, 1 - np.exp(d), rtol=1e-6)  # d/dlogp (e^d - d - 1)


def test_group_advantages():
    rewards = jnp.asarray([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = np.asarray(group_advantages(rewards, 4))
    std = np.std([1, 0, 1, 0], ddof=1)
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(adv[4:], 0.0)  # zero-std group: no signal, no NaN
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_group_advantages_skip_unscored_samples():
    rewards = jnp.asarray([1.0, jnp.nan, 0.0, 0.5, jnp.nan, 3.0, jnp.nan, jnp.nan])
    adv = np.asarray(group_advantages(rewards, 4))
    valid = np.array([1.0, 0.0, 0.5])
    expected = (valid - valid.mean()) / (np.std(valid, ddof=1) + 1e-4)
    np.testing.assert_allclose(adv[[0, 2, 3]], expected, rtol=1e-6)
    assert adv[1] == 0.0
    np.testing.assert_array_equal(adv[4:], 0.0)  # one scored sample: no std, no signal


def test_config_validation():
    with pytest.raises(ValueError, match="eps_high"):
        GRPOLossConfig(eps_high=0.0)
    with pytest.raises(ValueError, match="beta"):
        GRPOLossConfig(beta=-1.0)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(*map(jnp.asarray, (LOGP, OLD)), None, jnp.asarray(ADV), jnp.asarray(MASK),
                  GRPOLossConfig(beta=0.1))  # fmt: skip
