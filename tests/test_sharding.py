"""Sharding on one device (rules, mesh shapes) and, in a child process with 8 forced host
devices, the multi-device equivalence tests of tests/test_sharding_devices.py."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import model
from model import ModelConfig
from sharding.mesh import ParallelConfig, make_parallel
from sharding.rules import Rules, describe, mesh_axes_of
from tests.conftest import tiny_config
from tests.multidevice import run_on_8_devices
from train.run_dir import to_json


def test_mesh_shapes():
    assert ParallelConfig().shape(8) == (1, 8, 1, 1)
    assert ParallelConfig(fsdp=2, expert=4).shape(8) == (1, 2, 4, 1)
    assert ParallelConfig(data=2, tensor=2).shape(8) == (2, 2, 1, 2)
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        ParallelConfig(expert=3).shape(8)
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        ParallelConfig(fsdp=2, expert=2).shape(8)
    with pytest.raises(ValueError, match="expert must be a positive int"):
        ParallelConfig(expert=0)


def test_rule_tables():
    assert mesh_axes_of(Rules.DATA, "embed") == ()
    assert mesh_axes_of(Rules.FSDP, "embed") == ("fsdp",)
    assert mesh_axes_of(Rules.FSDP, "exp") == ()
    assert mesh_axes_of(Rules.FSDP_EP, "exp") == ("expert",)
    assert mesh_axes_of(Rules.FSDP_EP_TP, "heads") == ("tensor",)
    for rules in Rules:
        assert mesh_axes_of(rules, "activation_batch") == ("data", "fsdp", "expert")
        assert rules.value in describe(rules)


def test_the_model_follows_its_configs_rules_never_the_context():
    """ModelConfig.logical_rules is static, so one jitted function retraces when they change
    (flax's nn.logical_axis_rules context is not in jit's cache key: a function traced under
    one table would silently keep it). Ambient rules that differ are refused."""
    parallel = make_parallel(ParallelConfig(fsdp=1), devices=jax.devices()[:1])
    cfg = tiny_config()
    variables = model.init(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 8), jnp.int32)

    @functools.partial(jax.jit, static_argnums=0)
    def logits(cfg, variables, tokens):
        return model.forward(cfg, variables, tokens).logits

    constraints = lambda cfg: (
        logits.lower(cfg, variables, tokens).as_text().count("sdy.sharding_constraint")
    )
    with parallel.activate():
        configured = parallel.configure(cfg)
        assert configured.logical_rules == Rules.FSDP.table()
        counts = [constraints(c) for c in (configured, cfg, configured)]
        assert counts[0] == counts[2] > 0 and counts[1] == 0
        fresh = jax.jit(lambda v, t: model.forward(cfg, v, t).logits)
        ambient = nn.logical_axis_rules(Rules.FSDP_EP.table())
        with ambient, pytest.raises(ValueError, match=r"ModelConfig\.logical_rules"):
            fresh.lower(variables, tokens)
        with nn.logical_axis_rules(configured.logical_rules):  # the same table: no conflict
            model.forward(configured, variables, tokens)


def test_logical_rules_round_trip_and_validate():
    cfg = tiny_config(logical_rules=Rules.FSDP_EP_TP.table())
    again = ModelConfig.from_dict(json.loads(json.dumps(to_json(cfg))))
    assert again == cfg and hash(again) == hash(cfg)
    assert tiny_config(logical_rules=[["embed", "fsdp"], ["heads", None]]).logical_rules == (
        ("embed", ("fsdp",)),
        ("heads", ()),
    )
    for bad in ("embed", [("embed",)], [(1, "fsdp")], [("embed", [1])]):
        with pytest.raises(ValueError, match="logical_rules must be"):
            tiny_config(logical_rules=bad)


@pytest.mark.slow  # ~7 minutes on 2 cores
def test_on_8_simulated_devices():
    run_on_8_devices("tests/test_sharding_devices.py", timeout=1200)
