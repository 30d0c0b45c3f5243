"""The V3 learning-rate schedule and the AdamW weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from tests.conftest import tiny_config
from train.optimizer import LRSchedule, OptimizerConfig, decay_mask, make_optimizer

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


def test_schedule_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(warmup_steps=-1)
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
    norm = ("moe_layers", "attn_norm", "scale")
    kernel = ("moe_layers", "moe", "experts", "wo")
    get = lambda tree, keys: (
        tree[keys[0]][keys[1]][keys[2]]
        if len(keys) == 3
        else tree[keys[0]][keys[1]][keys[2]][keys[3]]
    )
    np.testing.assert_array_equal(get(new, norm), get(params, norm))
    np.testing.assert_allclose(get(new, kernel), get(params, kernel) * (1 - 0.1 * 0.1), rtol=1e-6)
