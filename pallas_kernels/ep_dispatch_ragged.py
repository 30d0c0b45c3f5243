"""Ragged expert-parallel all-to-all over remote DMA: only the used rows of each block travel.

The padded exchange (`pallas_kernels/ep_dispatch.py`) moves every [C, ...] block whole, though a
block holds only the copies routed to that device (on average C / P of its C rows). Here each
device also knows how many rows of block j are used (`send_counts[j]`) and how many rows device
i sends it (`recv_counts[i]`, from `exchange_counts`), and moves block j as cdiv(count, chunk)
DMAs of `chunk` rows (a DMA has a static shape; the number of DMAs is dynamic). Block i of the
result still lands at slot [i] of a padded [P, C, ...] receive buffer, so the output layout is
the padded exchange's: `ep_ragged_all_to_all_reference` is `lax.all_to_all` of the send buffer
with the rows past each count set to zero.

Rows past a count: the last chunk of a block carries up to chunk - 1 rows past the count, and
rows no chunk reaches are never written (uninitialized HBM). The wrapper sets every received
row past recv_counts[i] to zero, so the result does not depend on either and equals the
reference bit for bit. Counts are clipped to [0, C].

Counts travel with `lax.all_to_all` on the int32 [P] vector, not with a remote DMA: P integers
are one tiny XLA collective, and the kernel needs the received counts in SMEM (scalar
prefetch) before it issues its first wait, so an in-kernel count exchange would need a second
barrier-and-wait phase for no gain. The MoE path needs them once per layer: the return trip
(combine, and the gradient) is the same exchange with the two count vectors swapped.

Kernel (interpret-tested on CPU only, like the padded kernel):
- The barrier and the step order (device i sends to i + k and receives from i - k at step k)
  are the padded kernel's. Step k has one send and one receive DMA semaphore; a DMA semaphore
  counts bytes, and every DMA moves one chunk, so device i waits on its step-k receive
  semaphore with a chunk-shaped descriptor cdiv(recv_counts[i - k], chunk) times, and on its
  send semaphore cdiv(send_counts[i + k], chunk) times: exactly the bytes that arrive and
  leave, so every semaphore is back at zero when the kernel ends.
- The capacity C is padded up to a multiple of `chunk` (a copy of the send buffer; none when
  chunk divides C) so the last chunk of a full block stays in bounds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ep_dispatch import Interpret, _interpret_params, check_send_buffer

# The padded kernel uses 0; distinct ids keep the two kernels' barriers apart.
_COLLECTIVE_ID = 1


def _ragged_kernel(
    send_counts_ref, recv_counts_ref, x_ref, o_ref, local_sem, send_sems, recv_sems,
    *, axis_name, num_devices, chunk,
):  # fmt: skip
    """o[src, :count] on device dst = x[dst, :count] on device src, in chunks of `chunk` rows."""
    me = lax.axis_index(axis_name)

    def device(k):  # k in (-P, P): this device's peer k steps ahead
        return lax.rem(me + k + num_devices, num_devices)

    def num_chunks(count):
        return lax.div(count + chunk - 1, chunk)

    def rows(c):
        return pl.ds(pl.multiple_of(c * chunk, chunk), chunk)

    def local(c):
        return pltpu.make_async_copy(x_ref.at[me, rows(c)], o_ref.at[me, rows(c)], local_sem)

    def remote(k, c):
        return pltpu.make_async_remote_copy(
            x_ref.at[device(k), rows(c)], o_ref.at[me, rows(c)],
            send_sems.at[k - 1], recv_sems.at[k - 1],
            device_id={axis_name: device(k)}, device_id_type=pl.DeviceIdType.MESH,
        )  # fmt: skip

    barrier = pltpu.get_barrier_semaphore()
    for k in range(1, num_devices):
        pl.semaphore_signal(
            barrier, 1, device_id={axis_name: device(k)}, device_id_type=pl.DeviceIdType.MESH
        )
    pl.semaphore_wait(barrier, num_devices - 1)

    @pl.loop(0, num_chunks(send_counts_ref[me]))
    def _(c):
        local(c).start()

    for k in range(1, num_devices):

        @pl.loop(0, num_chunks(send_counts_ref[device(k)]))
        def _(c, k=k):
            remote(k, c).start()

    @pl.loop(0, num_chunks(send_counts_ref[me]))
    def _(c):
        local(0).wait()

    # Waits name chunk 0: only the semaphore and the chunk's byte count matter.
    for k in range(1, num_devices):

        @pl.loop(0, num_chunks(send_counts_ref[device(k)]))
        def _(c, k=k):
            remote(k, 0).wait_send()  # our chunks to me + k have left

        @pl.loop(0, num_chunks(recv_counts_ref[device(-k)]))
        def _(c, k=k):
            remote(k, 0).wait_recv()  # the chunks of me - k have landed


def _ragged_call(
    x_PxC_: jax.Array,
    send_counts_P: jax.Array,
    recv_counts_P: jax.Array,
    axis_name: str,
    chunk: int,
    interpret: Interpret,
) -> jax.Array:
    num_devices = check_send_buffer(x_PxC_, axis_name)
    for name, counts in (("send_counts", send_counts_P), ("recv_counts", recv_counts_P)):
        if counts.shape != (num_devices,) or not jnp.issubdtype(counts.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be an integer [P] = [{num_devices}] vector, got "
                f"{counts.dtype}{list(counts.shape)}"
            )
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int (rows per DMA), got {chunk!r}")
    C = x_PxC_.shape[1]
    send_counts_P = jnp.clip(send_counts_P, 0, C).astype(jnp.int32)
    recv_counts_P = jnp.clip(recv_counts_P, 0, C).astype(jnp.int32)
    if num_devices == 1:
        out = x_PxC_
    else:
        padded = -(-C // chunk) * chunk
        x = jnp.pad(x_PxC_, [(0, 0), (0, padded - C)] + [(0, 0)] * (x_PxC_.ndim - 2))
        kernel = functools.partial(
            _ragged_kernel, axis_name=axis_name, num_devices=num_devices, chunk=chunk
        )
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                out_specs=pl.BlockSpec(memory_space=pl.ANY),
                scratch_shapes=[
                    pltpu.SemaphoreType.DMA,
                    pltpu.SemaphoreType.DMA((num_devices - 1,)),
                    pltpu.SemaphoreType.DMA((num_devices - 1,)),
                ],
            ),
            compiler_params=pltpu.CompilerParams(collective_id=_COLLECTIVE_ID),
            interpret=_interpret_params(interpret),
        )(send_counts_P, recv_counts_P, x)[:, :C]
    return _zero_past(out, recv_counts_P)


def _zero_past(x_PxC_: jax.Array, counts_P: jax.Array) -> jax.Array:
    """Rows r >= counts[p] of block p set to zero."""
    P, C = x_PxC_.shape[:2]
    keep_PxC = jnp.arange(C) < counts_P[:, None]
    return jnp.where(keep_PxC.reshape(P, C, *(1,) * (x_PxC_.ndim - 2)), x_PxC_, 0)


# -- custom_vjp: the transpose is the reverse exchange (counts swapped) --------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ragged(x, send_counts, recv_counts, axis_name, chunk, interpret):
    return _ragged_call(x, send_counts, recv_counts, axis_name, chunk, interpret)


def _ragged_fwd(x, send_counts, recv_counts, axis_name, chunk, interpret):
    out = _ragged_call(x, send_counts, recv_counts, axis_name, chunk, interpret)
    return out, (send_counts, recv_counts)


def _ragged_bwd(axis_name, chunk, interpret, counts, g):
    send_counts, recv_counts = counts
    # Row r of block j reached device j iff r < send_counts[j]: those rows get their
    # gradient back from j, the others none (zeroed by the reverse exchange's mask).
    return _ragged_call(g, recv_counts, send_counts, axis_name, chunk, interpret), None, None


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


# -- public API ----------------------------------------------------------------------------


def exchange_counts(send_counts_P: jax.Array, *, axis_name: str) -> jax.Array:
    """recv_counts[i] = send_counts[my index] on device i: the rows each device sends here."""
    return lax.all_to_all(send_counts_P.astype(jnp.int32), axis_name, 0, 0, tiled=True)


@functools.partial(jax.jit, static_argnames=("axis_name", "chunk", "interpret"))
def ep_ragged_all_to_all(
    send_PxCxD: jax.Array,
    send_counts_P: jax.Array,
    recv_counts_P: jax.Array,
    *,
    axis_name: str,
    chunk: int,
    interpret: Interpret = False,
) -> jax.Array:
    """Rows [:send_counts[j]] of block j to slot [my index] of device j; block i of the result
    holds recv_counts[i] rows from device i, then zeros. recv_counts must be
    `exchange_counts(send_counts)`. Call inside shard_map; interpret=True runs the TPU
    interpreter. Differentiable in the buffer for float dtypes."""
    if jnp.issubdtype(send_PxCxD.dtype, jnp.inexact):
        return _ragged(send_PxCxD, send_counts_P, recv_counts_P, axis_name, chunk, interpret)
    return _ragged_call(send_PxCxD, send_counts_P, recv_counts_P, axis_name, chunk, interpret)


def ep_ragged_all_to_all_reference(
    send_PxCxD: jax.Array, send_counts_P: jax.Array, *, axis_name: str
) -> jax.Array:
    """`lax.all_to_all` of the send buffer with rows past each block's count set to zero."""
    C = send_PxCxD.shape[1]
    masked = _zero_past(send_PxCxD, jnp.clip(send_counts_P, 0, C))
    return lax.all_to_all(masked, axis_name, 0, 0, tiled=True)
