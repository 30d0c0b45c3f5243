"""The pure train step: losses, masks, bias update from global counts, non-finite handling."""

from __future__ import annotations

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


def _setup(loss_cfg=None, cfg=None):
    cfg = cfg or tiny_config()
    opt = make_optimizer(OptimizerConfig(schedule=SCHEDULE))
    state = init_state(cfg, opt, jax.random.key(0))
    step = jax.jit(make_train_step(cfg, loss_cfg or LossConfig(), opt, SCHEDULE))
    return cfg, state, step


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
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert int(state.step) == 8 and int(state.skipped) == 0
    bias = np.asarray(state.router_bias["moe_layers"]["moe"]["router"]["bias"])
    # Each step moves every bias by exactly +-gamma (or 0 when the expert sits at the mean).
    assert np.abs(bias).max() <= 8 * 1e-3 + 1e-9 and np.abs(bias).max() > 0
    assert set(metrics) >= {"loss", "ce", "mtp_loss", "balance_loss", "grad_norm", "maxvio"}
    assert metrics["expert_load"].shape == (cfg.num_moe_layers, cfg.moe.num_experts)


@pytest.mark.parametrize("balancing", [Balancing.AUX_LOSS, Balancing.NONE])
def test_other_balancing_modes_leave_the_bias_alone(balancing):
    cfg, state, step = _setup(LossConfig(balancing=balancing))
    state, metrics = step(state, _batch(cfg))
    bias = state.router_bias["moe_layers"]["moe"]["router"]["bias"]
    assert np.all(np.asarray(bias) == 0)
    ce = float(metrics["ce"]) + 0.3 * float(metrics["mtp_loss"])
    extra = 1e-2 * float(metrics["aux_loss"]) if balancing is Balancing.AUX_LOSS else 0.0
    assert float(metrics["loss"]) == pytest.approx(ce + extra, rel=1e-5)


def test_non_finite_step_keeps_the_state():
    cfg, state, step = _setup()
    emb = state.params["embed"]["embedding"]
    bad = state.replace(params={**state.params, "embed": {"embedding": emb.at[0].set(jnp.nan)}})
    batch = _batch(cfg)
    batch["inputs"] = batch["inputs"].at[0, 0].set(0)
    new, metrics = step(bad, batch)
    assert not bool(metrics["finite"])
    assert int(new.step) == 1 and int(new.skipped) == 1
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(bad.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        new.router_bias["moe_layers"]["moe"]["router"]["bias"],
        bad.router_bias["moe_layers"]["moe"]["router"]["bias"],
    )


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
