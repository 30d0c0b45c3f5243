"""The pure train step: losses, masks, bias update from global counts, non-finite handling."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.transformer import Aux
from tests.conftest import tiny_config
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.state import init_state
from train.step import (
    Balancing,
    LossConfig,
    make_train_step,
    max_violation,
    token_losses,
    update_router_bias,
)

B, L = 2, 16
SCHEDULE = LRSchedule(peak_lr=3e-3, warmup_steps=0, final_lr=3e-3)


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, L + 1)).astype(np.int32)
    segment_ids = np.ones((B, L), np.int32)
    segment_ids[:, L // 2 :] = 2
    positions = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.asarray(np.broadcast_to(positions, (B, L)).astype(np.int32)),
        "loss_mask": jnp.ones((B, L), jnp.float32).at[1, -3:].set(0.0),
    }


def _setup(loss_cfg=None, cfg=None, opt_cfg=None):
    cfg = cfg or tiny_config()
    opt_cfg = opt_cfg or OptimizerConfig(schedule=SCHEDULE)
    opt = make_optimizer(opt_cfg)
    state = init_state(cfg, opt, jax.random.key(0))
    step = jax.jit(make_train_step(cfg, loss_cfg or LossConfig(), opt, opt_cfg.schedule))
    return cfg, state, step


def _main_bias(state) -> np.ndarray:
    return np.asarray(state.router_bias["moe_layers"]["moe"]["router"]["bias"])


def test_bias_moves_toward_balance_from_global_counts():
    bias = {"moe_layers": {"moe": {"router": {"bias": jnp.zeros((2, 4))}}}}
    counts = jnp.array([[10, 2, 4, 4], [5, 5, 5, 5]])  # layer 0 mean 5; layer 1 balanced
    aux = Aux(counts, None, None, None, None, None)
    new = update_router_bias(bias, aux, jnp.float32(0.001))["moe_layers"]["moe"]["router"]["bias"]
    np.testing.assert_allclose(new, [[-0.001, 0.001, 0.001, 0.001], [0, 0, 0, 0]])
    assert bias["moe_layers"]["moe"]["router"]["bias"].sum() == 0  # input untouched


def test_max_violation():
    np.testing.assert_allclose(max_violation(jnp.array([[1, 1, 1, 1], [4, 0, 0, 0]])), [0, 3])


def test_mtp_targets_and_masks():
    cfg = tiny_config()
    batch = _batch(cfg)
    logits = jnp.zeros((B, L, cfg.vocab_size))
    out = type("Out", (), {"logits": logits, "mtp_logits": (logits,)})
    sums = token_losses(cfg, out, batch, mask_documents=False)
    assert float(sums["ce"][1]) == B * L - 3
    assert float(sums["mtp_1"][1]) == B * L - 1 - 4  # last position per row, masked tail
    masked = token_losses(cfg, out, batch, mask_documents=True)
    assert float(masked["mtp_1"][1]) == float(sums["mtp_1"][1]) - B  # document boundary
    np.testing.assert_allclose(sums["ce"][0] / sums["ce"][1], np.log(cfg.vocab_size), rtol=1e-5)


def test_train_step_learns_and_updates_bias():
    cfg, state, step = _setup()
    batch = _batch(cfg)
    losses, expected_bias = [], np.zeros((cfg.num_moe_layers, cfg.moe.num_experts))
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        # V3's rule from this step's global loads: an overloaded expert's bias goes DOWN by
        # gamma, an underloaded one's goes UP by gamma.
        load = np.asarray(metrics["expert_load"], np.float64)
        expected_bias += 1e-3 * np.sign(load.mean(-1, keepdims=True) - load)
    assert losses[-1] < losses[0] - 0.5
    assert int(state.step) == 8 and int(state.skipped) == 0
    assert np.abs(expected_bias).max() > 0  # the loads were uneven: the check has teeth
    np.testing.assert_allclose(_main_bias(state), expected_bias, rtol=0, atol=1e-8)
    assert set(metrics) >= {"loss", "ce", "mtp_loss", "balance_loss", "grad_norm", "maxvio"}
    chex.assert_shape(metrics["expert_load"], (cfg.num_moe_layers, cfg.moe.num_experts))
    chex.assert_tree_all_finite(state.params)


@pytest.mark.parametrize("balancing", list(Balancing))
def test_loss_composition_and_bias_in_every_balancing_mode(balancing):
    # Weights far from the defaults and from each other, so a term weighted by the wrong
    # coefficient, or the sequence-wise loss swapped for the batch-wise one, shows.
    loss_cfg = LossConfig(
        balancing=balancing, mtp_weight=0.4, balance_weight=0.5, aux_loss_weight=0.7
    )
    cfg, state, step = _setup(loss_cfg)
    new, metrics = step(state, _batch(cfg))
    m = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    extra = {
        Balancing.LOSS_FREE: 0.5 * m["balance_loss"],
        Balancing.AUX_LOSS: 0.7 * m["aux_loss"],
        Balancing.NONE: 0.0,
    }[balancing]
    assert abs(m["balance_loss"] - m["aux_loss"]) > 1e-3  # the two balance terms differ
    assert m["loss"] == pytest.approx(m["ce"] + 0.4 * m["mtp_loss"] + extra, rel=1e-6)
    moved = np.abs(_main_bias(new)).max()
    assert moved == (pytest.approx(1e-3) if balancing is Balancing.LOSS_FREE else 0.0)


def test_non_finite_step_keeps_the_state():
    cfg, state, step = _setup()
    emb = state.params["embed"]["embedding"]
    bad = state.replace(params={**state.params, "embed": {"embedding": emb.at[0].set(jnp.nan)}})
    batch = _batch(cfg)
    batch["inputs"] = batch["inputs"].at[0, 0].set(0)
    new, metrics = step(bad, batch)
    assert not bool(metrics["finite"])
    assert int(new.step) == 1 and int(new.skipped) == 1
    chex.assert_trees_all_equal(new.opt_state, bad.opt_state)
    chex.assert_trees_all_equal(new.router_bias, bad.router_bias)
    chex.assert_trees_all_equal(new.params, bad.params)


def test_a_skipped_step_keeps_lr_lambda_and_gamma_on_the_applied_schedule():
    # Adam with b1 = b2 = 0 and no weight decay moves each weight by lr * g / (|g| + eps):
    # the largest move in the tree IS the learning rate applied. The warmup gives every
    # update count its own rate (1e-3 per count), and lambda / gamma switch right after the
    # skipped step, so any schedule read at state.step instead of the update count shows.
    schedule = LRSchedule(peak_lr=1e-2, warmup_steps=10, final_lr=1e-2)
    opt_cfg = OptimizerConfig(schedule=schedule, b1=0.0, b2=0.0, weight_decay=0.0)
    loss_cfg = LossConfig(mtp_weight_switch_step=3, bias_update_stop_step=4, balance_weight=0.0)
    cfg, state, step = _setup(loss_cfg, opt_cfg=opt_cfg)
    good = _batch(cfg)
    poisoned = {**good, "loss_mask": good["loss_mask"].at[0, 0].set(jnp.nan)}
    applied_counts = []
    for i in range(7):
        new, metrics = step(state, poisoned if i == 2 else good)
        m = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        moves = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                             new.params, state.params)  # fmt: skip
        applied_lr = max(jax.tree.leaves(moves))
        bias_move = np.abs(_main_bias(new) - _main_bias(state))
        if i == 2:
            assert not m["finite"] and applied_lr == 0.0 and bias_move.max() == 0.0
        else:
            assert m["finite"]
            assert m["learning_rate"] == pytest.approx(applied_lr, rel=1e-3, abs=1e-9), i
            count = round(applied_lr / 1e-3)
            applied_counts.append(count)
            # lambda as applied in the loss; gamma as applied to the bias (moves are 0 or gamma).
            lam = (m["loss"] - m["ce"]) / m["mtp_loss"]
            assert lam == pytest.approx(float(loss_cfg.mtp_weight_at(count)), rel=1e-4), i
            assert m["mtp_weight"] == pytest.approx(lam, rel=1e-4), i
            gamma = float(loss_cfg.bias_rate_at(count))
            assert bias_move.max() == pytest.approx(gamma, abs=1e-9), i
            assert m["bias_update_rate"] == pytest.approx(gamma), i
        state = new
    assert applied_counts == [0, 1, 2, 3, 4, 5]  # the skip applied nothing and lost no rate
    assert int(state.step) == 7 and int(state.skipped) == 1


def test_loss_config_validation():
    with pytest.raises(ValueError, match="balancing"):
        LossConfig(balancing="aux")
    with pytest.raises(ValueError, match="bias_update_stop_step"):
        LossConfig(bias_update_stop_step=-5)


def test_schedules_of_gamma_and_lambda():
    cfg = LossConfig(mtp_weight_switch_step=10, bias_update_stop_step=20)
    assert float(cfg.mtp_weight_at(jnp.int32(9))) == pytest.approx(0.3)
    assert float(cfg.mtp_weight_at(jnp.int32(10))) == pytest.approx(0.1)
    assert float(cfg.bias_rate_at(jnp.int32(19))) == pytest.approx(1e-3)
    assert float(cfg.bias_rate_at(jnp.int32(20))) == 0.0
