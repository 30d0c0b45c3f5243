"""DeepSeekMoE layer: shared experts plus fine-grained routed experts, no token dropping."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from model import expert_parallel
from model import grouped_matmul as gmm
from model.config import FP8_UNSUPPORTED, FP8Config, GroupedMatmul, MoEConfig
from model.layers import MLP, fp8_dot, partitioned_normal, swiglu
from model.routing import expert_counts, route, sequence_balance_loss
from pallas_kernels import moe_permute
from pallas_kernels.fp8_grouped_gemm import BlockSizes as FP8GemmBlocks
from pallas_kernels.fp8_grouped_gemm import fp8_grouped_gemm
from pallas_kernels.grouped_gemm import grouped_gemm


@struct.dataclass
class MoEAux:
    """Per-layer routing statistics: token copies per expert [E], the sequence-wise balance
    loss (V3), and the same loss over the whole batch (a GShard/Switch-style auxiliary loss)."""

    expert_counts: jax.Array
    balance_loss: jax.Array
    batch_balance_loss: jax.Array


def routed_experts(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    w: dict[str, jax.Array],
    cfg: MoEConfig,
    fp8: FP8Config | None = None,
) -> jax.Array:
    """Sum_k weight_k * Expert_k(x): expert-sorted grouped matmuls (cost ~ routed rows), or
    every expert densely when that is cheaper (few tokens on CPU, see grouped_matmul.resolve).

    With fp8, the tiled scan and the dense path run V3's FP8 GEMMs per expert (jnp reference
    GEMM), PALLAS the FP8 grouped GEMM kernel; ragged_dot and REFERENCE have no FP8 form here
    (AUTO picks the tiled scan).
    """
    E = w["wi_gate"].shape[0]
    impl = gmm.resolve(cfg.grouped_matmul, x_NxD.shape[0], E, fp8=fp8 is not None)
    if fp8 is not None and impl in FP8_UNSUPPORTED:
        raise ValueError(
            "FP8 routed experts need grouped_matmul AUTO, TILED_SCAN, DENSE or PALLAS, "
            f"got {impl.name}"
        )
    if impl is GroupedMatmul.REFERENCE:
        return routed_experts_reference(x_NxD, experts_NxK, weights_NxK, w)
    if impl is GroupedMatmul.PALLAS:
        return pallas_experts(x_NxD, experts_NxK, weights_NxK, w, fp8=fp8, tile_rows=cfg.tile_rows)
    if impl is GroupedMatmul.DENSE:
        if fp8 is not None:
            return dense_experts_fp8(x_NxD, experts_NxK, weights_NxK, w, fp8)
        return dense_experts(x_NxD, experts_NxK, weights_NxK, w)
    if impl is not GroupedMatmul.TILED_SCAN:
        tile = 1
    elif cfg.tile_rows is None:
        tile = gmm.choose_tile(experts_NxK.size, E)
    else:
        tile = cfg.tile_rows
    layout = gmm.sort_by_expert(experts_NxK, E, tile)
    x_PxD = gmm.permute(x_NxD, layout)
    gate = gmm.grouped_matmul(x_PxD, w["wi_gate"], layout, impl, fp8)
    up = gmm.grouped_matmul(x_PxD, w["wi_up"], layout, impl, fp8)
    y_PxD = gmm.grouped_matmul(jax.nn.silu(gate) * up, w["wo"], layout, impl, fp8)
    return gmm.unpermute(y_PxD, layout, weights_NxK)


def dense_experts(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    w: dict[str, jax.Array],
) -> jax.Array:
    """Every expert on every token (batched over experts, weights used in their stored
    layout), mixed by the routing weights (0 for unchosen experts): N x E expert rows of work
    instead of N x K, but no sorting, gathering or per-tile loop."""
    N, D = x_NxD.shape
    E = w["wi_gate"].shape[0]
    coeff_NxE = jnp.zeros((N, E), x_NxD.dtype)
    coeff_NxE = coeff_NxE.at[jnp.arange(N)[:, None], experts_NxK].add(
        weights_NxK.astype(x_NxD.dtype)
    )
    x_ExNxD = jnp.broadcast_to(x_NxD, (E, N, D))
    gate_ExNxF = jnp.einsum("end,edf->enf", x_ExNxD, w["wi_gate"])
    up_ExNxF = jnp.einsum("end,edf->enf", x_ExNxD, w["wi_up"])
    h_ExNxF = jax.nn.silu(gate_ExNxF) * up_ExNxF * coeff_NxE.T[:, :, None]
    return jnp.einsum("enf,efd->end", h_ExNxF, w["wo"]).sum(axis=0)


def dense_experts_fp8(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    w: dict[str, jax.Array],
    fp8: FP8Config,
) -> jax.Array:
    """dense_experts with each expert's three GEMMs in FP8 (fp8_linear, reference GEMM)."""
    N = x_NxD.shape[0]
    E = w["wi_gate"].shape[0]
    coeff_NxE = jnp.zeros((N, E), x_NxD.dtype)
    coeff_NxE = coeff_NxE.at[jnp.arange(N)[:, None], experts_NxK].add(
        weights_NxK.astype(x_NxD.dtype)
    )
    dot = functools.partial(fp8_dot, fp8=dataclasses.replace(fp8, use_kernel=False))
    per_expert = jax.vmap(dot, in_axes=(None, 0))
    gate_ExNxF, up_ExNxF = per_expert(x_NxD, w["wi_gate"]), per_expert(x_NxD, w["wi_up"])
    h_ExNxF = jax.nn.silu(gate_ExNxF) * up_ExNxF * coeff_NxE.T[:, :, None]
    return jax.vmap(dot)(h_ExNxF, w["wo"]).sum(axis=0)


def pallas_experts(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    w: dict[str, jax.Array],
    interpret: bool | None = None,
    fp8: FP8Config | None = None,
    tile_rows: int | None = None,
) -> jax.Array:
    """routed_experts with the Pallas kernels: permute -> grouped GEMMs -> SwiGLU -> combine.

    interpret (default: on CPU) runs the kernels in Pallas interpret mode. With fp8 the GEMMs
    are fp8_grouped_gemm's; its Wgrad scales span one tile of rows, so the tile is the tiled
    scan's (tile_rows, else choose_tile) and both compute the same quantization."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if fp8 is not None and jax.default_backend() == "tpu" and not interpret:
        # Its generic build addresses a tile's expert inside the block (E x K x block_n of
        # codes), which on TPU would be copied into VMEM whole.
        raise ValueError(
            "grouped_matmul=pallas with ModelConfig.fp8 has no TPU build (the FP8 grouped "
            "GEMM is written for GPU); use grouped_matmul=tiled_scan for FP8 on TPU"
        )
    E = w["wi_gate"].shape[0]
    rows_MxD, weights_M, group_sizes_E, indices = moe_permute.permute(
        x_NxD, experts_NxK, weights_NxK.astype(x_NxD.dtype), E, interpret=interpret
    )
    if fp8 is None:
        gemm = functools.partial(grouped_gemm, group_sizes_E=group_sizes_E, interpret=interpret)
    else:
        tile = tile_rows or gmm.choose_tile(experts_NxK.size, E)
        gemm = functools.partial(
            fp8_grouped_gemm,
            group_sizes_E=group_sizes_E,
            pow2_scale=fp8.pow2_scale,
            block_sizes=FP8GemmBlocks(block_m=tile),
            interpret=interpret,
        )
    h_MxF = jax.nn.silu(gemm(rows_MxD, w["wi_gate"])) * gemm(rows_MxD, w["wi_up"])
    return moe_permute.combine(gemm(h_MxF, w["wo"]), weights_M, indices, interpret=interpret)


def routed_experts_reference(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    w: dict[str, jax.Array],
) -> jax.Array:
    """Plain loop over experts, each applied densely to every token (GroupedMatmul.REFERENCE)."""
    out_NxD = jnp.zeros_like(x_NxD)
    for e in range(w["wi_gate"].shape[0]):
        coeff_N = jnp.where(experts_NxK == e, weights_NxK, 0.0).sum(-1).astype(x_NxD.dtype)
        y_NxD = swiglu(x_NxD, w["wi_gate"][e], w["wi_up"][e], w["wo"][e])
        out_NxD = out_NxD + coeff_N[:, None] * y_NxD
    return out_NxD


class RoutedExperts(nn.Module):
    """Holds the routed expert weights [E, D, F] / [E, F, D]."""

    cfg: MoEConfig
    init_std: float
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, d_model: int) -> dict[str, jax.Array]:
        c = self.cfg
        shape_in = (c.num_experts, d_model, c.expert_dim)
        shape_out = (c.num_experts, c.expert_dim, d_model)
        init_in = partitioned_normal(self.init_std, ("exp", "embed", "mlp"))
        init_out = partitioned_normal(self.init_std, ("exp", "mlp", "embed"))
        return {
            "wi_gate": self.param("wi_gate", init_in, shape_in, self.param_dtype),
            "wi_up": self.param("wi_up", init_in, shape_in, self.param_dtype),
            "wo": self.param("wo", init_out, shape_out, self.param_dtype),
        }


class Router(nn.Module):
    """fp32 sigmoid gate; its correction bias lives in the 'router_bias' collection."""

    cfg: MoEConfig
    init_std: float
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x_NxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        E = self.cfg.num_experts
        kernel = self.param(
            "kernel",
            partitioned_normal(self.init_std, ("embed", None)),
            (x_NxD.shape[-1], E),
            self.param_dtype,
        )
        # Not a parameter: no gradient, no weight decay; the trainer updates it from loads.
        bias = self.variable(
            "router_bias",
            "bias",
            nn.with_logical_partitioning(jnp.zeros, ("exp",)),
            (E,),
            jnp.float32,
        )
        logits = x_NxD.astype(jnp.float32) @ kernel.astype(jnp.float32)
        return jax.nn.sigmoid(logits), bias.value


class MoE(nn.Module):
    """x [B, T, D] -> (routed + shared expert output [B, T, D], MoEAux)."""

    cfg: MoEConfig
    init_std: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    fp8: FP8Config | None = None  # FP8 experts (routed and shared); the router stays fp32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, MoEAux]:
        c = self.cfg
        B, T, D = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(B * T, D)
        scores_NxE, bias_E = Router(c, self.init_std, self.param_dtype, name="router")(x_NxD)
        experts_NxK, weights_NxK = route(scores_NxE, bias_E, c)
        w = RoutedExperts(c, self.init_std, self.param_dtype, name="experts")(D)
        w = jax.tree.map(lambda a: jnp.asarray(a, self.dtype), w)
        # Under a mesh: per-device routing, or tokens sent to their experts' devices.
        local = functools.partial(routed_experts, cfg=c, fp8=self.fp8)
        out_NxD = expert_parallel.routed_experts(
            x_NxD, experts_NxK, weights_NxK, w, local, c.ep_exchange
        )
        out_BxTxD = out_NxD.reshape(B, T, D)
        if c.num_shared_experts:
            shared = MLP(
                c.expert_dim * c.num_shared_experts,
                self.init_std,
                self.dtype,
                self.param_dtype,
                self.fp8,
                name="shared",
            )
            out_BxTxD = out_BxTxD + shared(x_BxTxD)
        aux = MoEAux(
            expert_counts=expert_counts(experts_NxK, c.num_experts),
            balance_loss=sequence_balance_loss(
                scores_NxE.reshape(B, T, -1), experts_NxK.reshape(B, T, -1), c.top_k
            ),
            batch_balance_loss=sequence_balance_loss(scores_NxE[None], experts_NxK[None], c.top_k),
        )
        return out_BxTxD, aux
