"""The model's public functions: init, forward, parameter counts, logical partition specs."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from model.config import ModelConfig
from model.transformer import Aux, Transformer


@struct.dataclass
class Output:
    """logits [B, T, V] f32; mtp_logits: one [B, T, V] per MTP depth (depth k at position i
    predicts token i + k + 1; the last k + 1 positions have no target); hidden [B, T, D] is the
    final-normed hidden state; aux holds the routing statistics."""

    logits: jax.Array
    mtp_logits: tuple[jax.Array, ...]
    hidden: jax.Array
    aux: Aux


def _dummy_tokens() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def init_boxed(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Variables with their nn.LogicallyPartitioned boxes (for sharding/)."""
    tokens = _dummy_tokens()
    variables = Transformer(cfg).init(rng, tokens, jnp.zeros_like(tokens), None)
    return {k: v for k, v in variables.items() if k != "perturbations"}


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh variables {'params': ..., 'router_bias': ...} as plain arrays."""
    return nn.unbox(jax.jit(init_boxed, static_argnums=0)(cfg, rng))


def logical_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every variable, as a pytree of PartitionSpecs."""
    boxed = jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def forward(
    cfg: ModelConfig,
    variables: dict,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> Output:
    """Full-sequence forward pass. tokens [B, T] int; positions default to 0..T-1.

    With segment_ids [B, T], tokens attend only within their own segment (packed documents).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, mtp_logits, hidden, aux = Transformer(cfg).apply(
        variables, tokens, positions, segment_ids
    )
    return Output(logits=logits, mtp_logits=mtp_logits, hidden=hidden, aux=aux)


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """total: all parameters except MTP; activated: per token, without the input embedding;
    mtp: the MTP modules without the embedding and head they share."""

    total: int
    activated: int
    mtp: int

    def __str__(self) -> str:
        return ", ".join(f"{k} {_human(getattr(self, k))}" for k in ("total", "activated", "mtp"))


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameter counts from shapes alone (jax.eval_shape: nothing is allocated)."""
    shapes = jax.eval_shape(functools.partial(init, cfg), jax.random.key(0))["params"]
    mtp = _size(shapes.get("mtp", {}))
    total = _size(shapes) - mtp
    activated = total - _size(shapes["embed"])
    if cfg.num_moe_layers:
        routed = _size(shapes["moe_layers"]["moe"]["experts"])
        inactive = cfg.moe.num_experts - cfg.moe.top_k
        activated -= routed * inactive // cfg.moe.num_experts
    return ParamCount(total=total, activated=activated, mtp=mtp)
