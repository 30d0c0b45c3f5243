"""The remote-DMA exchanges of pallas_kernels/ep_dispatch.py (padded) and ep_dispatch_ragged.py,
interpreted on 8 host devices, move exactly what `jax.lax.all_to_all` moves, and a MoE layer
gives the same values and gradients under every EPExchange (run by tests/test_ep_dispatch.py;
skipped in a process with fewer devices)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model.config import EPExchange
from model.expert_parallel import routed_experts_ep
from pallas_kernels.ep_dispatch import (
    combine,
    dispatch,
    ep_all_to_all,
    ep_all_to_all_reference,
)
from pallas_kernels.ep_dispatch_ragged import (
    ep_ragged_all_to_all,
    ep_ragged_all_to_all_reference,
    exchange_counts,
)

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


# -- a MoE layer: dispatch, local experts, combine vs model/expert_parallel.py ---------------

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
    return routed_experts_ep(x, experts, weights, w, _local_experts, axis, EPExchange.ALL_TO_ALL)


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


@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged"])
def test_lowers_to_a_mosaic_tpu_kernel(ragged):
    # No TPU here: this checks Pallas -> Mosaic lowering (barrier, MESH device ids over one
    # axis of a 2-D mesh, remote DMAs; ragged: scalar-prefetched counts, dynamic chunk loops),
    # not the TPU compiler or the hardware.
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    spec = P(("data", "expert"))
    x = jax.ShapeDtypeStruct((32, 256, 128), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    counts = jax.ShapeDtypeStruct((8, 4), jnp.int32, sharding=NamedSharding(mesh, spec))
    if ragged:
        fn = functools.partial(_ragged, axis="expert", chunk=32, interpret=False)
        specs = dict(mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
        fn = jax.jit(jax.shard_map(fn, **specs))
        traced = fn.trace(x, counts)
    else:
        fn = functools.partial(ep_all_to_all, axis_name="expert", interpret=False)
        traced = _sharded(fn, mesh, spec).trace(x)
    assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()


# -- the ragged exchange: only the used rows travel, in chunks ------------------------------


def _ragged(x, counts, axis, chunk, interpret=INTERPRET):
    send = counts[0]
    recv = exchange_counts(send, axis_name=axis)
    return ep_ragged_all_to_all(
        x, send, recv, axis_name=axis, chunk=chunk, interpret=interpret
    )  # fmt: skip


def _ragged_reference(x, counts, axis):
    return ep_ragged_all_to_all_reference(x, counts[0], axis_name=axis)


def _counts(key, ep, capacity):
    """[8, ep]: row d holds device d's rows per destination, with empty and full blocks."""
    counts = jax.random.randint(key, (8, ep), 0, capacity + 1)
    return counts.at[0, 1].set(0).at[1, 0].set(capacity).at[2].set(0).at[3].set(capacity)


@pytest.mark.parametrize(
    "name,dtype,tail,chunk",
    [
        ("1d-8", jnp.float32, (3, 5), 4),
        ("2x4-over-4", jnp.float32, (3, 5), 4),
        ("2x4-over-4", jnp.bfloat16, (4,), 3),
        ("1d-8", jnp.int32, (), 5),
    ],
)
def test_ragged_exchange_equals_all_to_all_on_the_used_rows(name, dtype, tail, chunk):
    shape, names, axis = MESHES[name]
    mesh = jax.make_mesh(shape, names)
    spec = P(names)
    ep, C = mesh.shape[axis], 10  # chunk 3 and 4 leave a partial last chunk, 5 does not
    # No zeros in the send buffer: rows past a count must not leak through.
    x = jax.random.randint(jax.random.key(0), (8 * ep, C, *tail), 1, 1000).astype(dtype)
    counts = _counts(jax.random.key(1), ep, C)
    x, counts = _put(x, mesh, spec), _put(counts, mesh, spec)
    specs = dict(mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    got = jax.jit(jax.shard_map(functools.partial(_ragged, axis=axis, chunk=chunk), **specs))
    got = np.asarray(got(x, counts))
    full = np.asarray(_sharded(functools.partial(_reference, axis=axis), mesh, spec)(x))
    want = jax.jit(jax.shard_map(functools.partial(_ragged_reference, axis=axis), **specs))
    np.testing.assert_array_equal(got, np.asarray(want(x, counts)))
    # Against plain all_to_all: on device d (position d % ep of its group), block src holds
    # the first counts[src's device][d % ep] rows of plain all_to_all, then zeros.
    c = np.asarray(counts)
    for d in range(8):
        group = d - d % ep
        for src in range(ep):
            n, block = c[group + src, d % ep], d * ep + src
            np.testing.assert_array_equal(got[block, :n], full[block, :n])
            assert (got[block, n:] == 0).all()
    assert got.dtype == dtype


def test_ragged_gradient_is_the_reverse_ragged_exchange():
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    spec = P(("data", "expert"))
    x = _put(jax.random.normal(jax.random.key(1), (32, 9, 8)), mesh, spec)
    w = _put(jax.random.normal(jax.random.key(2), (32, 9, 8)), mesh, spec)
    counts = _put(_counts(jax.random.key(3), 4, 9), mesh, spec)

    def loss(exchange, x, w, counts):
        return jnp.sum(w * exchange(x, counts) ** 2)

    def grads(exchange):
        fn = jax.shard_map(
            jax.value_and_grad(functools.partial(loss, exchange)),
            mesh=mesh, in_specs=(spec, spec, spec), out_specs=(P(), spec), check_vma=False,
        )  # fmt: skip
        return jax.jit(fn)(x, w, counts)

    kernel = functools.partial(_ragged, axis="expert", chunk=4)
    (l_got, g_got), (l_want, g_want) = (
        grads(kernel),
        grads(functools.partial(_ragged_reference, axis="expert")),
    )
    np.testing.assert_array_equal(np.asarray(g_got), np.asarray(g_want))
    np.testing.assert_array_equal(np.asarray(l_got), np.asarray(l_want))


@pytest.mark.parametrize("mode", ["eager", "on_wait"])
def test_ragged_no_races_and_semaphores_end_at_zero(mode, capfd):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode=mode)
    mesh = jax.make_mesh((8,), ("expert",))
    spec = P("expert")
    x = _put(jnp.arange(64 * 6 * 2, dtype=jnp.float32).reshape(64, 6, 2) + 1, mesh, spec)
    counts = _put(_counts(jax.random.key(4), 8, 6), mesh, spec)
    specs = dict(mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    fn = functools.partial(_ragged, axis="expert", chunk=4, interpret=params)
    got = jax.jit(jax.shard_map(fn, **specs))(x, counts)
    want = jax.jit(jax.shard_map(functools.partial(_ragged_reference, axis="expert"), **specs))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want(x, counts)))
    assert not tpu_interpret.races.races_found
    # The interpreter prints (does not raise) when a semaphore is left non-zero at kernel exit:
    # a wait count that does not match the bytes sent.
    assert "non-zero count" not in capfd.readouterr().out


# -- the MoE layer under every exchange ----------------------------------------------------


def _moe_layer(exchange, router_bias=None):
    """(MoE layer with `exchange`, its variables, an input x, the fsdp=2 x expert=4 mesh)."""
    from model.config import GroupedMatmul, MoEConfig
    from model.moe import MoE
    from sharding.mesh import ParallelConfig, make_parallel
    from sharding.rules import Rules

    cfg = MoEConfig(
        num_experts=8,
        num_shared_experts=0,
        top_k=2,
        expert_dim=12,
        grouped_matmul=GroupedMatmul.DENSE,
        ep_exchange=exchange,
    )
    layer = MoE(cfg, init_std=0.3)
    x = jax.random.normal(jax.random.key(5), (4, 64, 16))  # 256 tokens: 64 copies per device
    variables = layer.init(jax.random.key(6), x)
    if router_bias is not None:
        variables = {**variables, "router_bias": {"router": {"bias": router_bias}}}
    parallel = make_parallel(ParallelConfig(fsdp=2, expert=4, rules=Rules.FSDP_EP))
    return layer, variables, x, parallel


def _moe_layer_run(exchange, router_bias):
    """(output, gradients w.r.t. params and input) of one MoE layer under Parallel.activate()
    with fsdp=2 x expert=4 and MoEConfig.ep_exchange = `exchange`."""
    layer, variables, x, parallel = _moe_layer(exchange, router_bias)

    def loss(params, x):
        out, _ = layer.apply({**variables, "params": params}, x)
        return jnp.sum(jnp.sin(out)), out

    def run(params, x):
        return jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)

    with parallel.activate(), nn.logical_axis_rules(parallel.logical_rules):
        (_, out), grads = jax.jit(run)(variables["params"], x)
    return out, grads


ROUTER_BIASES = {
    "random": jnp.zeros(8),
    "all-to-device-0": jnp.zeros(8).at[:2].set(100.0),  # full blocks: 2 chunks of 32 rows
}


@functools.cache
def _moe_all_to_all(routing):
    return _moe_layer_run(EPExchange.ALL_TO_ALL, ROUTER_BIASES[routing])


@pytest.mark.parametrize("routing", list(ROUTER_BIASES))
@pytest.mark.parametrize(
    "exchange",
    [EPExchange.RAGGED_ALL_TO_ALL, EPExchange.REMOTE_DMA, EPExchange.REMOTE_DMA_RAGGED],
    ids=lambda e: e.value,
)
def test_moe_layer_is_the_same_under_every_exchange(exchange, routing):
    got, got_grads = _moe_layer_run(exchange, ROUTER_BIASES[routing])
    want, want_grads = _moe_all_to_all(routing)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_one_jitted_function_follows_the_exchange_its_config_names():
    """The exchange is a static config field, so jit keys on it: one jitted function called
    with a config naming another exchange traces that exchange (a context variable read at
    trace time would have kept the first)."""
    import dataclasses

    from model.moe import MoE

    layer, variables, x, parallel = _moe_layer(EPExchange.ALL_TO_ALL)

    @functools.partial(jax.jit, static_argnames="cfg")
    def forward(variables, x, cfg):
        return MoE(cfg, init_std=0.3).apply(variables, x)[0]

    padded = layer.cfg
    ragged = dataclasses.replace(padded, ep_exchange=EPExchange.RAGGED_ALL_TO_ALL)
    with parallel.activate(), nn.logical_axis_rules(parallel.logical_rules):
        got = {}
        for cfg in (padded, ragged, padded):
            out = forward(variables, x, cfg=cfg)
            got[cfg.ep_exchange] = out, forward.lower(variables, x, cfg=cfg).as_text()
    (out_padded, text_padded), (out_ragged, text_ragged) = got.values()
    # Padded: the rows and the expert ids there, the outputs back. The CPU emulation of the
    # ragged exchange: the send sizes and two offset vectors, then 2 per exchange (rows and
    # landing offsets) for rows, expert ids and outputs.
    assert text_padded.count("all_to_all") == 3
    assert text_ragged.count("all_to_all") == 3 + 2 * 3
    np.testing.assert_allclose(np.asarray(out_ragged), np.asarray(out_padded), 1e-6, 1e-6)
