"""The expert-parallel remote-DMA exchange: argument checks here, and in a child process with
8 forced host devices the interpreted multi-device tests of tests/test_ep_dispatch_devices.py
(tests/multidevice.py, as tests/test_sharding.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels.ep_dispatch import ep_all_to_all
from tests.multidevice import run_on_8_devices


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
    run_on_8_devices("tests/test_ep_dispatch_devices.py", timeout=600)
