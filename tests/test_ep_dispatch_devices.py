"""The remote-DMA exchange of pallas_kernels/ep_dispatch.py, interpreted on 8 host devices,
moves exactly what `jax.lax.all_to_all` moves (run by tests/test_ep_dispatch.py; skipped in a
process with fewer devices)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.ep_dispatch import (
    combine,
    dispatch,
    ep_all_to_all,
    ep_all_to_all_reference,
)
from sharding.expert_parallel import routed_experts_ep

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: run through tests/test_ep_dispatch.py"
)

INTERPRET = True  # no TPU in CI: the TPU interpreter simulates the remote DMAs


def _kernel(x, axis):
    return ep_all_to_all(x, axis_name=axis, interpret=INTERPRET)


def _reference(x, axis):
    return ep_all_to_all_reference(x, axis_name=axis)


def _sharded(fn, mesh, spec):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def _put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


# Each device's buffer is [P, ...]: the global array stacks the 8 buffers on the leading axis.
MESHES = {
    "1d-8": ((8,), ("expert",), "expert"),
    "2x4-over-4": ((2, 4), ("data", "expert"), "expert"),
    "2x4-over-2": ((2, 4), ("data", "expert"), "data"),
}


@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.parametrize(
    "dtype,tail", [(jnp.float32, (3, 5)), (jnp.bfloat16, (2, 4)), (jnp.int32, (3,))]
)
def test_exchange_equals_all_to_all(name, dtype, tail):
    shape, names, axis = MESHES[name]
    mesh = jax.make_mesh(shape, names)
    spec = P(names)
    ep = mesh.shape[axis]
    x = jax.random.randint(jax.random.key(0), (8 * ep, *tail), -1000, 1000).astype(dtype)
    x = _put(x, mesh, spec)
    got = _sharded(functools.partial(_kernel, axis=axis), mesh, spec)(x)
    want = _sharded(functools.partial(_reference, axis=axis), mesh, spec)(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(x))  # blocks did move


def test_exchange_twice_is_identity_and_gradient_is_reverse_exchange():
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    spec = P(("data", "expert"))
    x = _put(jax.random.normal(jax.random.key(1), (32, 3, 8)), mesh, spec)
    w = _put(jax.random.normal(jax.random.key(2), (32, 3, 8)), mesh, spec)

    def loss(exchange, x, w):
        return jnp.sum(w * exchange(x, "expert") ** 2)

    def grads(exchange):
        fn = jax.shard_map(
            jax.value_and_grad(functools.partial(loss, exchange)),
            mesh=mesh, in_specs=(spec, spec), out_specs=(P(), spec), check_vma=False,
        )  # fmt: skip
        return jax.jit(fn)(x, w)

    (l_got, g_got), (l_want, g_want) = grads(_kernel), grads(_reference)
    np.testing.assert_array_equal(np.asarray(g_got), np.asarray(g_want))
    np.testing.assert_array_equal(np.asarray(l_got), np.asarray(l_want))
    twice = _sharded(lambda a: _kernel(_kernel(a, "expert"), "expert"), mesh, spec)(x)
    np.testing.assert_array_equal(np.asarray(twice), np.asarray(x))


@pytest.mark.parametrize("mode", ["eager", "on_wait"])
def test_no_races(mode):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode=mode)
    mesh = jax.make_mesh((8,), ("expert",))
    spec = P("expert")
    x = _put(jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4), mesh, spec)
    fn = functools.partial(ep_all_to_all, axis_name="expert", interpret=params)
    got = _sharded(fn, mesh, spec)(x)
    want = _sharded(functools.partial(_reference, axis="expert"), mesh, spec)(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not tpu_interpret.races.races_found


# -- a MoE layer: dispatch, local experts, combine vs sharding/expert_parallel.py ------------

E, N, K, D, F = 16, 32, 2, 8, 6


def _local_experts(x_RxD, experts_Rx1, weights_Rx1, w):
    y_RxF = jnp.einsum("rd,rdf->rf", x_RxD, w["wi_gate"][experts_Rx1[:, 0]])
    return y_RxF * weights_Rx1


def _moe_inputs():
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (N, D))
    experts = jax.vmap(lambda k: jax.random.choice(k, E, (K,), replace=False))(
        jax.random.split(keys[1], N)
    ).astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (N, K)))
    w = {"wi_gate": jax.random.normal(keys[3], (E, D, F)) / np.sqrt(D)}
    return x, experts, weights, w


def _moe_kernel(x, experts, weights, w, mesh, axis):
    def body(x, experts, weights, w):
        e_local = w["wi_gate"].shape[0]
        recv_x, recv_e, layout = dispatch(
            x, experts, experts_per_device=e_local, axis_name=axis, interpret=INTERPRET
        )
        ep, M, _ = recv_x.shape
        y = _local_experts(
            recv_x.reshape(ep * M, -1), recv_e.reshape(ep * M, 1), jnp.ones((ep * M, 1)), w
        )
        return combine(y.reshape(ep, M, -1), layout, weights, axis_name=axis, interpret=INTERPRET)

    tokens = P(axis)
    specs = (tokens, tokens, tokens, {"wi_gate": P(axis)})
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=tokens, check_vma=False)
    return fn(x, experts, weights, w)


def _moe_shard_map(x, experts, weights, w, mesh, axis):
    return routed_experts_ep(x, experts, weights, w, _local_experts, axis, ragged=False)


def _dense(x, experts, weights, w):
    y = jnp.einsum("nd,nkdf->nkf", x, w["wi_gate"][experts])
    return jnp.einsum("nkf,nk->nf", y, weights)


@pytest.mark.parametrize("shape,names", [((8,), ("expert",)), ((2, 4), ("data", "expert"))])
def test_moe_dispatch_combine_matches_shard_map_path(shape, names):
    # Auto axes, as sharding/mesh.py builds them: GSPMD reshards into the shard_maps.
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    x, experts, weights, w = _moe_inputs()

    def loss(path, x, weights, w):
        out = path(x, experts, weights, w, mesh, "expert")
        return jnp.sum(jnp.sin(out)), out

    def run(path):
        grad = jax.value_and_grad(functools.partial(loss, path), (0, 1, 2), has_aux=True)
        with jax.set_mesh(mesh):  # routed_experts_ep reads the mesh from the context
            return jax.jit(grad)(x, weights, w)

    (_, got), g_got = run(_moe_kernel)
    (_, want), g_want = run(_moe_shard_map)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(_dense(x, experts, weights, w)), 1e-5, 1e-5
    )
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_lowers_to_a_mosaic_tpu_kernel():
    # No TPU here: this checks Pallas -> Mosaic lowering (barrier, MESH device ids over one
    # axis of a 2-D mesh, remote DMAs), not the TPU compiler or the hardware.
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    spec = P(("data", "expert"))
    fn = functools.partial(ep_all_to_all, axis_name="expert", interpret=False)
    x = jax.ShapeDtypeStruct((32, 16, 128), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    lowered = _sharded(fn, mesh, spec).trace(x).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()
