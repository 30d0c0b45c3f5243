"""The expert-parallel remote-DMA exchange: argument checks here, and in a child process with
8 forced host devices the interpreted multi-device tests of tests/test_ep_dispatch_devices.py
(the same mechanism as tests/test_sharding.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels.ep_dispatch import ep_all_to_all

ROOT = Path(__file__).resolve().parents[1]


def test_rejects_a_buffer_without_one_block_per_device():
    mesh = jax.make_mesh((1,), ("expert",))
    fn = jax.shard_map(
        lambda x: ep_all_to_all(x, axis_name="expert", interpret=True),
        mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"P = 1 \(the size of mesh axis 'expert'\)"):
        fn(jnp.zeros((2, 3, 4)))
    x = jnp.arange(12.0).reshape(1, 3, 4)
    assert (fn(x) == x).all()  # one device: its own block stays


def test_on_8_simulated_devices():
    # Optimization level 0 halves compile time; both sides of every comparison share it.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist",
           "tests/test_ep_dispatch_devices.py"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout.splitlines()[-1]
