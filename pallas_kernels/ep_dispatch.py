"""Expert-parallel dispatch / combine over remote DMA: the DeepEP idea as a Pallas TPU kernel.

Called inside `shard_map` over the expert mesh axis (size P). Every device holds a send buffer
[P, C, ...] whose block j is meant for device j; the kernel DMAs block j straight into slot
[my index] of device j's receive buffer, so afterwards block i of the receive buffer came from
device i. That is `jax.lax.all_to_all(x, axis, 0, 0, tiled=True)` (`ep_all_to_all_reference`),
the padded exchange `model/expert_parallel.py` runs on CPU, and it is its own transpose:
combine is the same exchange applied to the experts' outputs, and so is the gradient.
Every block moves whole (capacity C, mostly empty rows); `ep_dispatch_ragged.py` moves only
the used rows. The MoE layer runs this kernel under MoEConfig.ep_exchange=remote_dma
(EPExchange.REMOTE_DMA; the ragged one is remote_dma_ragged).

    dispatch: token copies -> [P, M, D] by owner device -> exchange -> the owner's experts
    combine:  expert outputs [P, M, D] -> exchange -> back in the sender's slots -> weighted sum

Kernel design (interpret-tested on CPU only; this repository has no TPU in CI):
- Inputs and outputs stay in HBM (`memory_space=ANY`); each block moves with one DMA, HBM to
  remote HBM, so there is no tiling and no BlockSizes.
- A barrier first: a device may write into a peer's output buffer only once the peer runs the
  kernel (the Pallas TPU distributed pattern: signal every peer's barrier semaphore, wait for
  P - 1 signals; needs `collective_id`).
- At step k = 1..P-1 device i sends to device i + k (mod P), so every device sends to and
  receives from one distinct peer per step instead of all hitting device 0 first. Each step has
  its own send and receive semaphore: device i receives from i - k on the semaphore device
  i - k signals for its step k, which is why one descriptor's `wait()` covers both directions
  (block sizes are equal). The own block is a local DMA.
- Device ids are `{axis_name: j}` in MESH coordinates: on a multi-axis mesh the other axes keep
  this device's coordinates, so the exchange runs within each expert group.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sort_by_expert import sort_by_expert

Interpret = bool | pltpu.InterpretParams


# -- send buffers by destination device ----------------------------------------------------


class DestinationSlots(NamedTuple):
    """Where each token copy m = n * K + k sits in the send buffer: block dest, row slot; and
    the used rows of each block (the ragged exchanges send only those)."""

    dest_M: jax.Array
    slot_M: jax.Array
    counts_P: jax.Array  # int32


def pack_by_destination(
    x_nxD: jax.Array, experts_nxK: jax.Array, experts_per_device: int, num_devices: int
) -> tuple[jax.Array, jax.Array, DestinationSlots]:
    """Send buffers [P, n*K, D] (token rows) and [P, n*K] (local expert ids) by owner device.

    Capacity n*K per destination: room for all of this device's copies, so none is dropped
    (the padded, no-drop layout). Empty rows are zeros for expert 0.
    """
    n, K = experts_nxK.shape
    M = n * K
    expert_M = experts_nxK.reshape(M).astype(jnp.int32)
    dest_M = expert_M // experts_per_device
    # A copy's slot: its rank among the copies to the same device (stable, so token order).
    by_dest = sort_by_expert(dest_M, num_devices)
    slot_M = by_dest.rank_M
    send_x = jnp.zeros((num_devices, M, x_nxD.shape[-1]), x_nxD.dtype)
    send_x = send_x.at[dest_M, slot_M].set(x_nxD[jnp.arange(M) // K])
    send_e = (
        jnp.zeros((num_devices, M), jnp.int32).at[dest_M, slot_M].set(expert_M % experts_per_device)
    )
    return send_x, send_e, DestinationSlots(dest_M, slot_M, by_dest.sizes_G)


# -- kernel --------------------------------------------------------------------------------


def _exchange_kernel(x_ref, o_ref, local_sem, send_sems, recv_sems, *, axis_name, num_devices):
    """o[src] on device dst = x[dst] on device src, for every pair (src, dst) of `axis_name`."""
    me = lax.axis_index(axis_name)

    def peer(k):
        return {axis_name: lax.rem(me + k, num_devices)}

    barrier = pltpu.get_barrier_semaphore()
    for k in range(1, num_devices):
        pl.semaphore_signal(barrier, 1, device_id=peer(k), device_id_type=pl.DeviceIdType.MESH)
    pl.semaphore_wait(barrier, num_devices - 1)

    local = pltpu.make_async_copy(x_ref.at[me], o_ref.at[me], local_sem)
    local.start()
    remote = []
    for k in range(1, num_devices):
        dst = lax.rem(me + k, num_devices)
        copy = pltpu.make_async_remote_copy(
            x_ref.at[dst], o_ref.at[me], send_sems.at[k - 1], recv_sems.at[k - 1],
            device_id=peer(k), device_id_type=pl.DeviceIdType.MESH,
        )  # fmt: skip
        copy.start()
        remote.append(copy)
    local.wait()
    for copy in remote:
        copy.wait()  # our send to me + k and our receive from me - k


def _interpret_params(interpret: Interpret) -> pltpu.InterpretParams | None:
    # The generic interpreter (interpret=True elsewhere) has no remote DMAs or semaphores; the
    # TPU interpreter simulates them across the shard_map's devices.
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else None


def check_send_buffer(x_PxC_: jax.Array, axis_name: str) -> int:
    """P, the size of mesh axis `axis_name`, after checking the buffer is [P, capacity, ...]."""
    num_devices = lax.axis_size(axis_name)
    if x_PxC_.ndim < 2 or x_PxC_.shape[0] != num_devices:
        raise ValueError(
            f"send buffer must be [P, capacity, ...] with P = {num_devices} (the size of mesh "
            f"axis {axis_name!r}), got shape {x_PxC_.shape}"
        )
    return num_devices


def _exchange_call(x_PxC_: jax.Array, axis_name: str, interpret: Interpret) -> jax.Array:
    num_devices = check_send_buffer(x_PxC_, axis_name)
    if num_devices == 1:
        return x_PxC_
    kernel = functools.partial(_exchange_kernel, axis_name=axis_name, num_devices=num_devices)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x_PxC_.shape, x_PxC_.dtype),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[
            pltpu.SemaphoreType.DMA,
            pltpu.SemaphoreType.DMA((num_devices - 1,)),
            pltpu.SemaphoreType.DMA((num_devices - 1,)),
        ],
        compiler_params=pltpu.CompilerParams(collective_id=0),
        interpret=_interpret_params(interpret),
    )(x_PxC_)


# -- custom_vjp: the transpose of the exchange is the exchange -----------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _exchange(x, axis_name, interpret):
    return _exchange_call(x, axis_name, interpret)


def _exchange_fwd(x, axis_name, interpret):
    return _exchange_call(x, axis_name, interpret), None


def _exchange_bwd(axis_name, interpret, _, g):
    return (_exchange_call(g, axis_name, interpret),)


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


# -- public API ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("axis_name", "interpret"))
def ep_all_to_all(send_PxCxD: jax.Array, *, axis_name: str, interpret: Interpret = False):
    """Block j of this device's [P, C, ...] buffer to device j of `axis_name`; block i of the
    result came from device i. Call inside shard_map; interpret=True runs the TPU interpreter
    (remote DMAs simulated across the CPU devices). Differentiable for float dtypes."""
    if jnp.issubdtype(send_PxCxD.dtype, jnp.inexact):
        return _exchange(send_PxCxD, axis_name, interpret)
    return _exchange_call(send_PxCxD, axis_name, interpret)


def ep_all_to_all_reference(send_PxCxD: jax.Array, *, axis_name: str) -> jax.Array:
    """The same exchange as `jax.lax.all_to_all` (split and concatenate the leading axis)."""
    return lax.all_to_all(send_PxCxD, axis_name, 0, 0, tiled=True)


def dispatch(
    x_nxD: jax.Array,
    experts_nxK: jax.Array,
    *,
    experts_per_device: int,
    axis_name: str,
    interpret: Interpret = False,
) -> tuple[jax.Array, jax.Array, DestinationSlots]:
    """Token copies to the devices owning their experts: (rows [P, n*K, D] and local expert
    ids [P, n*K] received from each device, the slots `combine` needs). Inside shard_map."""
    num_devices = lax.axis_size(axis_name)
    send_x, send_e, slots = pack_by_destination(x_nxD, experts_nxK, experts_per_device, num_devices)
    exchange = functools.partial(ep_all_to_all, axis_name=axis_name, interpret=interpret)
    return exchange(send_x), exchange(send_e), slots


def combine(
    y_PxMxD: jax.Array,
    slots: DestinationSlots,
    weights_nxK: jax.Array,
    *,
    axis_name: str,
    interpret: Interpret = False,
) -> jax.Array:
    """Expert outputs back to their tokens' devices, summed with the top-k weights: [n, D]."""
    back = ep_all_to_all(y_PxMxD, axis_name=axis_name, interpret=interpret)
    n, K = weights_nxK.shape
    y_nxKxD = back[slots.dest_M, slots.slot_M].reshape(n, K, -1)
    return jnp.einsum("nkd,nk->nd", y_nxKxD, weights_nxK.astype(y_nxKxD.dtype))
