"""The expert-parallel remote-DMA exchanges and the EPExchange switch: argument checks and the
config field here, and in a child process with 8 forced host devices the interpreted
multi-device tests of tests/test_ep_dispatch_devices.py (tests/multidevice.py, as
tests/test_sharding.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.overrides import apply
from model import expert_parallel
from model.config import EPExchange, MoEConfig
from model.expert_parallel import resolve_exchange
from pallas_kernels.ep_dispatch import ep_all_to_all
from pallas_kernels.ep_dispatch_ragged import ep_ragged_all_to_all
from sharding.mesh import ParallelConfig
from tests.multidevice import run_on_8_devices
from train.pretrain import PretrainConfig


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


def test_ragged_rejects_bad_counts_and_chunks():
    mesh = jax.make_mesh((1,), ("expert",))

    def run(x, counts, chunk):
        def fn(x, c):
            return ep_ragged_all_to_all(x, c, c, axis_name="expert", chunk=chunk, interpret=True)

        return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(x, counts)

    x = jnp.arange(12.0).reshape(1, 3, 4)
    with pytest.raises(ValueError, match=r"send_counts must be an integer \[P\] = \[1\]"):
        run(x, jnp.array([1.0]), 2)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        run(x, jnp.array([1]), 0)
    # One device: its own block stays, rows past the count zeroed (counts clipped to C).
    np.testing.assert_array_equal(run(x, jnp.array([2]), 2), x.at[:, 2:].set(0))
    np.testing.assert_array_equal(run(x, jnp.array([7]), 2), x)


def test_exchange_choice_is_a_model_config_field():
    run = apply(PretrainConfig(), ["model.moe.ep_exchange=remote_dma"])
    assert run.model.moe.ep_exchange is EPExchange.REMOTE_DMA
    moe = MoEConfig(8, 0, 2, 4)
    assert moe.ep_exchange is EPExchange.AUTO
    cfg = apply(moe, ["ep_exchange=REMOTE_DMA_RAGGED"])
    assert cfg.ep_exchange is EPExchange.REMOTE_DMA_RAGGED
    with pytest.raises(ValueError, match=r"expected one of .*'remote_dma'"):
        apply(moe, ["ep_exchange=dma"])
    with pytest.raises(ValueError, match=r"MoEConfig\.ep_exchange must be an EPExchange"):
        MoEConfig(8, 0, 2, 4, ep_exchange="remote_dma")
    # Nothing ambient: the mesh config has no exchange to set.
    with pytest.raises(ValueError, match="unknown field 'ep_exchange'"):
        apply(ParallelConfig(), ["ep_exchange=remote_dma"])
    assert resolve_exchange(EPExchange.AUTO) is EPExchange.ALL_TO_ALL  # AUTO on CPU
    for exchange in EPExchange:
        if exchange is not EPExchange.AUTO:
            assert resolve_exchange(exchange) is exchange


def test_remote_dma_is_an_error_on_gpu(monkeypatch):
    monkeypatch.setattr(expert_parallel.jax, "default_backend", lambda: "gpu")
    assert resolve_exchange(EPExchange.AUTO) is EPExchange.RAGGED_ALL_TO_ALL
    for exchange in (EPExchange.REMOTE_DMA, EPExchange.REMOTE_DMA_RAGGED):
        with pytest.raises(ValueError, match=r"Mosaic TPU kernels .* not available on gpu"):
            resolve_exchange(exchange)


@pytest.mark.slow  # ~2 minutes on 2 cores
def test_on_8_simulated_devices():
    run_on_8_devices("tests/test_ep_dispatch_devices.py", timeout=600)
