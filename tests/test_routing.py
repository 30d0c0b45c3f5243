"""Router: hand-computed selections and weights, balance loss and counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model import MoEConfig
from model.routing import expert_counts, route, sequence_balance_loss

# One token, 8 experts in 4 groups of 2. Group scores (sum of the top-2 = both members):
# g0 = 1.0, g1 = 0.5, g2 = 1.5, g3 = 0.83.
SCORES = jnp.array([[0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.05, 0.78]])


def _cfg(**kw) -> MoEConfig:
    base = dict(num_experts=8, num_shared_experts=0, top_k=2, expert_dim=4, num_groups=4)
    base.update(top_groups=2, routed_scaling_factor=2.5)
    base.update(kw)
    return MoEConfig(**base)


def test_top2_in_top_groups_with_normalized_scaled_weights():
    experts, weights = route(SCORES, jnp.zeros(8), _cfg())
    assert sorted(experts[0].tolist()) == [0, 4]
    order = np.argsort(np.asarray(experts[0]))
    np.testing.assert_allclose(np.asarray(weights[0])[order], np.array([0.9, 0.8]) / 1.7 * 2.5)


def test_group_limit_excludes_a_high_scoring_expert():
    limited, _ = route(SCORES, jnp.zeros(8), _cfg(top_k=3))
    unlimited, _ = route(SCORES, jnp.zeros(8), _cfg(top_k=3, num_groups=1, top_groups=1))
    assert sorted(limited[0].tolist()) == [0, 4, 5]  # expert 7 (0.78) sits in dropped g3
    assert sorted(unlimited[0].tolist()) == [0, 4, 7]


def test_dropped_groups_are_minus_inf_not_zero():
    # The biased scores of the kept group are negative: masking dropped groups with 0 (as HF
    # once did) would let a dropped expert (0 > -0.2) take the second slot.
    scores = jnp.array([[0.6, 0.1, 0.3, 0.2]])
    bias = jnp.array([0.0, -0.3, -0.35, -0.35])  # biased: [0.6, -0.2 | -0.05, -0.15]
    cfg = _cfg(num_experts=4, num_groups=2, top_groups=1, top_k=2)
    experts, weights = route(scores, bias, cfg)
    assert sorted(experts[0].tolist()) == [0, 1]  # both from the kept group g0 (0.4 > -0.2)
    by_expert = dict(zip(experts[0].tolist(), np.asarray(weights[0]).tolist(), strict=True))
    np.testing.assert_allclose([by_expert[0], by_expert[1]], [0.6 / 0.7 * 2.5, 0.1 / 0.7 * 2.5])


def test_bias_changes_selection_but_not_weights():
    bias = jnp.zeros(8).at[1].set(0.85)  # expert 1 biased to 0.95, g0 becomes the top group
    experts, weights = route(SCORES, bias, _cfg())
    assert sorted(experts[0].tolist()) == [0, 1]
    by_expert = dict(zip(experts[0].tolist(), np.asarray(weights[0]).tolist(), strict=True))
    # Weights use the unbiased scores 0.9 and 0.1: normalized then scaled by 2.5.
    np.testing.assert_allclose([by_expert[0], by_expert[1]], [2.25, 0.25], rtol=1e-6)


def test_without_normalization_weights_are_scaled_raw_scores():
    experts, weights = route(SCORES, jnp.zeros(8), _cfg(norm_topk_prob=False))
    np.testing.assert_allclose(
        np.sort(np.asarray(weights[0])), np.sort(np.asarray(SCORES[0, experts[0]]) * 2.5)
    )


def test_expert_counts_sum_to_routed_copies():
    experts = jnp.array([[0, 1], [1, 2], [1, 7]])
    np.testing.assert_array_equal(expert_counts(experts, 8), [1, 3, 1, 0, 0, 0, 0, 1])


def test_sequence_balance_loss_formula():
    rng = np.random.default_rng(0)
    B, T, E, K = 2, 5, 4, 2
    scores = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32))
    experts = jnp.asarray(np.argsort(-np.asarray(scores), axis=-1)[..., :K])
    expected = []
    for b in range(B):
        f = np.array([(np.asarray(experts[b]) == i).sum() for i in range(E)]) * E / (K * T)
        p = (np.asarray(scores[b]) / np.asarray(scores[b]).sum(-1, keepdims=True)).mean(0)
        expected.append((f * p).sum())
    np.testing.assert_allclose(sequence_balance_loss(scores, experts, K), np.mean(expected), 1e-6)


def test_balanced_routing_gives_loss_one():
    # Uniform scores and perfectly balanced selections: f_i = 1 and P_i = 1/E, so the sum is 1.
    E, K, T = 4, 2, 4
    scores = jnp.full((1, T, E), 0.5)
    experts = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    np.testing.assert_allclose(sequence_balance_loss(scores, experts, K), 1.0, rtol=1e-6)
