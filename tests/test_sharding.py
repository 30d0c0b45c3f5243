"""Sharding on one device (rules, mesh shapes) and, in a child process with 8 forced host
devices, the multi-device equivalence tests of tests/test_sharding_devices.py."""

from __future__ import annotations

import pytest

from sharding.mesh import ParallelConfig
from sharding.rules import Rules, describe, mesh_axes_of
from tests.multidevice import run_on_8_devices


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


def test_on_8_simulated_devices():
    run_on_8_devices("tests/test_sharding_devices.py", timeout=1200)
