"""The V3 learning-rate schedule and the AdamW weight-decay mask."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from tests.conftest import tiny_config
from train.optimizer import (
    LRSchedule,
    OptimizerConfig,
    decay_mask,
    make_optimizer,
    update_count,
)

SCHEDULE = LRSchedule(
    peak_lr=2.2e-4,
    warmup_steps=100,
    constant_steps=200,
    decay_steps=400,
    min_lr=2.2e-5,
    min_steps=50,
    final_lr=7.3e-6,
)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (50, 1.1e-4),  # halfway through the linear warmup
        (100, 2.2e-4),  # peak
        (299, 2.2e-4),  # still constant
        (300, 2.2e-4),  # cosine starts at the peak
        (500, (2.2e-4 + 2.2e-5) / 2),  # halfway down the cosine
        (699, 2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5) * (1 + np.cos(np.pi * 399 / 400))),
        (700, 2.2e-5),  # min-lr plateau
        (749, 2.2e-5),
        (750, 7.3e-6),  # final constant
        (10**6, 7.3e-6),
    ],
)
def test_schedule_values(step, expected):
    assert float(SCHEDULE(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def _piecewise_reference(s: LRSchedule, step: int) -> float:
    """The hand-written formula the optax schedule replaced, in float64, phase by phase."""
    warm_end, const_end, decay_end, min_end = s.boundaries
    if step < warm_end:
        return s.peak_lr * step / s.warmup_steps
    if step < const_end:
        return s.peak_lr
    if step < decay_end:
        progress = (step - const_end) / s.decay_steps
        return s.min_lr + 0.5 * (s.peak_lr - s.min_lr) * (1 + np.cos(np.pi * progress))
    if step < min_end:
        return s.min_lr
    return s.final_lr


@pytest.mark.parametrize(
    "schedule",
    [
        SCHEDULE,
        LRSchedule(),  # V3 defaults: warmup then straight to final_lr
        LRSchedule(warmup_steps=0, decay_steps=7, min_lr=1e-5),  # no warmup, no plateaus
        LRSchedule(warmup_steps=3, constant_steps=0, decay_steps=0, min_steps=4),
        LRSchedule(peak_lr=1e-2, warmup_steps=1, min_lr=1e-2, final_lr=1e-2),
    ],
)
def test_optax_schedule_equals_the_piecewise_formula(schedule):
    edges = [b + d for b in [0, *schedule.boundaries] for d in (-1, 0, 1) if b + d >= 0]
    steps = sorted(set(edges) | set(range(0, schedule.boundaries[-1] + 20, 7)) | {10**7})
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))
    want = np.array([_piecewise_reference(schedule, s) for s in steps])
    # optax's warmup is end - (end - start)(1 - t/T): float32 rounding of the peak, not of
    # the value, so early warmup steps agree to ~1e-6 of peak_lr, not of themselves.
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * schedule.peak_lr)
    # The optimizer applies exactly these: its schedule is the same object's optax form.
    assert float(schedule.to_optax()(schedule.boundaries[0])) == pytest.approx(
        float(schedule(schedule.boundaries[0]))
    )


def test_update_count_is_the_schedule_count():
    params = {"w": jnp.ones((3, 2))}
    opt = make_optimizer(OptimizerConfig(schedule=SCHEDULE))
    state = opt.init(params)
    for _ in range(3):
        _, state = opt.update({"w": jnp.ones((3, 2))}, state, params)
    assert int(update_count(state)) == 3
    assert update_count(optax.adamw(1e-3).init(params)) is None  # constant LR: no schedule


def test_schedule_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"peak_lr = 0\.0: must be > 0 when decay_steps > 0"):
        LRSchedule(peak_lr=0.0, decay_steps=10)
    with pytest.raises(ValueError, match="b2"):
        OptimizerConfig(b2=1.0)
    with pytest.raises(ValueError, match="moments_dtype"):
        OptimizerConfig(moments_dtype="int8")


def test_v3_defaults():
    cfg = OptimizerConfig()
    assert (cfg.b1, cfg.b2, cfg.weight_decay, cfg.clip_norm) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.schedule.peak_lr == 2.2e-4 and cfg.schedule.final_lr == 7.3e-6


def test_decay_mask_excludes_norms_and_biases():
    params = model.init(tiny_config(), jax.random.key(0))["params"]
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert not any(m for k, m in flat.items() if "scale" in k)  # all norms, stacked or not
    assert flat["['moe_layers']['moe']['experts']['wi_gate']"]
    assert flat["['moe_layers']['attn']['wkv_b']"]
    assert flat["['moe_layers']['moe']['router']['kernel']"]
    assert flat["['embed']['embedding']"]
    assert not flat["['moe_layers']['attn']['kv_norm']['scale']"]


def test_weight_decay_skips_masked_leaves():
    # With zero gradients only weight decay moves parameters: norms must not move.
    params = model.init(tiny_config(), jax.random.key(0))["params"]
    sched = LRSchedule(peak_lr=0.1, warmup_steps=0, final_lr=0.1)
    opt = make_optimizer(OptimizerConfig(schedule=sched))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    # Every leaf the mask excludes is untouched; every decayed one shrinks by lr * wd.
    expected = jax.tree.map(
        lambda p, decays: p * (1 - 0.1 * 0.1) if decays else p, params, decay_mask(params)
    )
    chex.assert_trees_all_close(new, expected, rtol=1e-6)
    chex.assert_trees_all_equal(new["moe_layers"]["attn_norm"], params["moe_layers"]["attn_norm"])
