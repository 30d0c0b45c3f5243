"""Sharding on one device (rules, mesh shapes) and, in a child process with 8 forced host
devices, the multi-device equivalence tests of tests/test_sharding_devices.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sharding.mesh import ParallelConfig
from sharding.rules import Rules, describe, mesh_axes_of

ROOT = Path(__file__).resolve().parents[1]


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
    # Optimization level 0 halves compile time; both sides of every comparison share it.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist",
           "tests/test_sharding_devices.py"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout.splitlines()[-1]
