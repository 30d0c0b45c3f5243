"""The routed experts under a mesh; expert parallelism: token copies travel to the device
that owns their expert and back. Part of the MoE layer (model/moe.py calls `routed_experts`).

Without expert sharding but with the batch split, each device routes its own tokens through
all-gathered expert weights. Under rules that map the logical `exp` axis onto a mesh axis of
size > 1 (sharding's Rules.FSDP_EP and up) it runs `routed_experts_ep`:

  1. each device groups its token copies by destination (owner = expert // experts_per_device)
  2. an exchange over the expert axis delivers them; the owner runs its local experts
  3. the reverse exchange, then each token sums its top-k outputs with its routing weights

No token is dropped: every receive buffer has room for all copies of every device, so it
holds expert-axis-size x a device's copies, mostly empty. The exchange is
MoEConfig.ep_exchange (`EPExchange`, model/config.py), a static config field passed in, so a
function jitted with one exchange retraces when the config names another:

  ALL_TO_ALL         padded blocks through `lax.all_to_all` (every block moves whole)
  RAGGED_ALL_TO_ALL  only the real rows, `lax.ragged_all_to_all`; on CPU, where that
                     collective is not implemented, an emulation over all_to_all (so tests
                     check its offsets)
  REMOTE_DMA         the padded exchange as a Pallas TPU kernel over remote DMA
                     (pallas_kernels/ep_dispatch.py)
  REMOTE_DMA_RAGGED  the kernel moving only the used rows, in chunks of RAGGED_CHUNK_ROWS
                     (pallas_kernels/ep_dispatch_ragged.py)
  AUTO               RAGGED_ALL_TO_ALL on GPU/TPU, ALL_TO_ALL on CPU

The remote-DMA kernels are Mosaic TPU kernels: compiled on TPU, run by the TPU interpreter on
CPU (slow; for tests), an error on GPU. Every exchange gives the same values and gradients.
Routing, and so the expert counts the bias update reads, is computed on the global batch
outside, by GSPMD. The mesh is the one current at trace time (jax.set_mesh; jit keys on it), the
logical-axis rules are ModelConfig.logical_rules (the model's entry points trace under them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from model.config import EPExchange
from pallas_kernels.ep_dispatch import ep_all_to_all, pack_by_destination
from pallas_kernels.ep_dispatch_ragged import ep_ragged_all_to_all, exchange_counts
from pallas_kernels.sort_by_expert import sort_by_expert

EXPERTS = "exp"
BATCH = "activation_batch"

# Rows per DMA of REMOTE_DMA_RAGGED (capped at the block size): a multiple of the TPU sublane
# tiling of 32-, 16- and 8-bit dtypes (8, 16, 32 rows), so chunks start on tile boundaries,
# and at most 31 rows past a block's count travel with it.
RAGGED_CHUNK_ROWS = 32

_REMOTE_DMA = (EPExchange.REMOTE_DMA, EPExchange.REMOTE_DMA_RAGGED)


def resolve_exchange(exchange: EPExchange) -> EPExchange:
    """The concrete exchange for this backend: AUTO picks RAGGED_ALL_TO_ALL on GPU/TPU and
    ALL_TO_ALL on CPU; remote DMA on GPU is an error."""
    if not isinstance(exchange, EPExchange):
        raise ValueError(f"ep_exchange must be an EPExchange, got {exchange!r}")
    backend = jax.default_backend()
    if exchange is EPExchange.AUTO:
        return EPExchange.ALL_TO_ALL if backend == "cpu" else EPExchange.RAGGED_ALL_TO_ALL
    if exchange in _REMOTE_DMA and backend not in ("cpu", "tpu"):
        raise ValueError(
            f"ep_exchange={exchange.value}: the remote-DMA kernels are Mosaic TPU kernels (run "
            f"compiled on TPU, interpreted on CPU), not available on {backend}; use "
            "auto, all_to_all or ragged_all_to_all"
        )
    return exchange


def _rule(logical: str) -> tuple[str, ...]:
    for name, axes in nn.get_logical_axis_rules():
        if name == logical:
            return (axes,) if isinstance(axes, str) else tuple(axes or ())
    return ()


def active_axis() -> str | None:
    """The mesh axis experts are split over in the current context, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = [a for a in _rule(EXPERTS) if mesh.shape.get(a, 1) > 1]
    if len(axes) > 1:
        raise ValueError(f"experts may be split over one mesh axis, the rules give {axes}")
    return axes[0] if axes else None


def _exchange(x_ExMx_: jax.Array, axis: str) -> jax.Array:
    """Send block e of the leading axis to device e of `axis`; block e of the result came
    from device e."""
    shape = x_ExMx_.shape
    flat = x_ExMx_.reshape(shape[0] * shape[1], *shape[2:])
    return jax.lax.all_to_all(flat, axis, 0, 0, tiled=True).reshape(shape)


def _block_exchanges(
    exchange: EPExchange, axis: str, send_counts_P: jax.Array, capacity: int
) -> tuple[Callable, Callable]:
    """(there, back): the exchange of the [P, M, ...] send buffers and the one that returns the
    experts' outputs, for the exchanges with a padded receive layout."""
    if exchange is EPExchange.ALL_TO_ALL:
        there = functools.partial(_exchange, axis=axis)
        return there, there
    interpret = pltpu.InterpretParams() if jax.default_backend() == "cpu" else False
    if exchange is EPExchange.REMOTE_DMA:
        there = functools.partial(ep_all_to_all, axis_name=axis, interpret=interpret)
        return there, there
    assert exchange is EPExchange.REMOTE_DMA_RAGGED, exchange
    recv_counts_P = exchange_counts(send_counts_P, axis_name=axis)
    ragged = functools.partial(
        ep_ragged_all_to_all,
        axis_name=axis,
        chunk=min(RAGGED_CHUNK_ROWS, capacity),
        interpret=interpret,
    )
    # Back: every device returns exactly the rows it received.
    return (
        lambda buf: ragged(buf, send_counts_P, recv_counts_P),
        lambda buf: ragged(buf, recv_counts_P, send_counts_P),
    )


def _dispatch_compute_combine(x_nxD, experts_nxK, weights_nxK, w, *, local_experts, axis, exchange):
    ep = jax.lax.axis_size(axis)
    n, K = experts_nxK.shape
    M = n * K
    E_local = w["wi_gate"].shape[0]
    send_x, send_expert, slots = pack_by_destination(x_nxD, experts_nxK, E_local, ep)
    there, back = _block_exchanges(exchange, axis, slots.counts_P, M)
    recv_x, recv_expert = there(send_x), there(send_expert)

    # Empty slots hold zeros for expert 0 (the ragged kernel zeroes the rows past its counts):
    # SwiGLU(0) = 0 and nobody reads them back.
    rows = ep * M
    y_RxD = local_experts(
        recv_x.reshape(rows, -1),
        recv_expert.reshape(rows, 1),
        jnp.ones((rows, 1), weights_nxK.dtype),
        w,
    )
    y_back = back(y_RxD.reshape(ep, M, -1))
    y_nxKxD = y_back[slots.dest_M, slots.slot_M].reshape(n, K, -1)
    return jnp.einsum("nkd,nk->nd", y_nxKxD, weights_nxK.astype(y_nxKxD.dtype))


def _ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis):
    """`jax.lax.ragged_all_to_all` where the backend has it; on CPU (not implemented there)
    the same semantics over a padded all_to_all."""
    if jax.default_backend() != "cpu":
        return jax.lax.ragged_all_to_all(
            operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
            axis_name=axis,
        )  # fmt: skip
    ep, M = input_offsets.shape[0], operand.shape[0]
    r = jnp.arange(M)
    rows = jnp.clip(input_offsets[:, None] + r, 0, M - 1)
    sending = (r < send_sizes[:, None]).reshape(ep, M, *(1,) * (operand.ndim - 1))
    received = _exchange(jnp.where(sending, operand[rows], 0), axis)
    # Where sender i's rows land here: its output_offsets entry for this device.
    landing = _exchange(output_offsets[:, None], axis)[:, 0]
    slots = jnp.where(r < recv_sizes[:, None], landing[:, None] + r, output.shape[0])
    return output.at[slots].set(received, mode="drop")


def _dispatch_ragged(x_nxD, experts_nxK, weights_nxK, w, *, local_experts, axis):
    """The same as _dispatch_compute_combine with ragged exchanges: only real rows travel.
    The receive buffer still has room for every device's copies (no token dropped)."""
    ep = jax.lax.axis_size(axis)
    n, K = experts_nxK.shape
    M = n * K
    E_local = w["wi_gate"].shape[0]
    expert_M = experts_nxK.reshape(M)
    by_dest = sort_by_expert(expert_M // E_local, ep)  # copies grouped by destination device
    order_M, send_sizes, send_starts = by_dest.order_M, by_dest.sizes_G, by_dest.starts_G
    recv_sizes = jax.lax.all_to_all(send_sizes, axis, 0, 0, tiled=True)
    recv_starts = jnp.cumsum(recv_sizes) - recv_sizes
    land_there = jax.lax.all_to_all(recv_starts, axis, 0, 0, tiled=True)
    rows = ep * M
    exchange = functools.partial(_ragged_exchange, axis=axis)
    recv_x = exchange(
        x_nxD[order_M // K], jnp.zeros((rows, x_nxD.shape[-1]), x_nxD.dtype),
        send_starts, send_sizes, land_there, recv_sizes,
    )  # fmt: skip
    recv_expert = exchange(
        (expert_M % E_local)[order_M].astype(jnp.int32), jnp.zeros((rows,), jnp.int32),
        send_starts, send_sizes, land_there, recv_sizes,
    )  # fmt: skip
    y_RxD = local_experts(recv_x, recv_expert[:, None], jnp.ones((rows, 1), weights_nxK.dtype), w)
    # Back: the rows of sender i return to where they started in its sorted buffer.
    land_back = jax.lax.all_to_all(send_starts, axis, 0, 0, tiled=True)
    y_sorted = exchange(
        y_RxD, jnp.zeros((M, y_RxD.shape[-1]), y_RxD.dtype),
        recv_starts, recv_sizes, land_back, send_sizes,
    )  # fmt: skip
    y_nxKxD = jnp.zeros_like(y_sorted).at[order_M].set(y_sorted).reshape(n, K, -1)
    return jnp.einsum("nkd,nk->nd", y_nxKxD, weights_nxK.astype(y_nxKxD.dtype))


def _token_axes(mesh, num_tokens: int) -> tuple[str, ...]:
    """The batch's mesh axes (size > 1) that split num_tokens evenly. A count they do not
    divide (model init's one dummy token) is split over fewer: any split gives the same
    result."""
    batch, ways = [], 1
    for a in _rule(BATCH):
        size = mesh.shape.get(a, 1)
        if size > 1 and num_tokens % (ways * size) == 0:
            batch.append(a)
            ways *= size
    return tuple(batch)


def routed_experts(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    w: dict[str, jax.Array],
    local_experts: Callable,
    exchange: EPExchange,
) -> jax.Array:
    """sum_k weight_k * Expert_k(x) as the current mesh and rules say.

    `local_experts(x, experts, weights, w)` is the single-device computation. Experts split
    over a mesh axis: tokens travel to them by `exchange` (`routed_experts_ep`). Otherwise,
    with the batch split: each device routes its own tokens through gathered expert weights
    (left to GSPMD, the sort by expert would run on the global batch on every device). No
    mesh: local.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local_experts(x_NxD, experts_NxK, weights_NxK, w)
    axis = active_axis()
    if axis is not None:
        return routed_experts_ep(x_NxD, experts_NxK, weights_NxK, w, local_experts, axis, exchange)
    batch = _token_axes(mesh, x_NxD.shape[0])
    if not batch:
        return local_experts(x_NxD, experts_NxK, weights_NxK, w)
    tokens = P(batch)
    fn = jax.shard_map(
        local_experts,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, {k: P() for k in w}),
        out_specs=tokens,
        check_vma=False,
    )
    return fn(x_NxD, experts_NxK, weights_NxK, w)


def routed_experts_ep(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    w: dict[str, jax.Array],
    local_experts: Callable,
    axis: str,
    exchange: EPExchange,
) -> jax.Array:
    """sum_k weight_k * Expert_k(x) with experts split over `axis` (see the module doc).

    `local_experts(x, experts, weights, w_local)` computes a device's own experts; exchange
    (MoEConfig.ep_exchange) says how token copies travel.
    """
    exchange = resolve_exchange(exchange)
    if exchange is EPExchange.RAGGED_ALL_TO_ALL:
        dispatch = _dispatch_ragged
    else:
        dispatch = functools.partial(_dispatch_compute_combine, exchange=exchange)
    mesh = jax.sharding.get_abstract_mesh()
    E, ep = w["wi_gate"].shape[0], mesh.shape[axis]
    if E % ep:
        raise ValueError(f"{E} experts cannot be split evenly over {axis} = {ep} devices")
    tokens = P(_token_axes(mesh, x_NxD.shape[0]) or None)
    experts = P(axis)
    fn = jax.shard_map(
        functools.partial(dispatch, local_experts=local_experts, axis=axis),
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, {k: experts for k in w}),
        out_specs=tokens,
        check_vma=False,
    )
    return fn(x_NxD, experts_NxK, weights_NxK, w)
