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
from model.layers import axis_rules
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
    with axis_rules(cfg):
        variables = Transformer(cfg).init(rng, tokens, jnp.zeros_like(tokens), None)
    return {k: v for k, v in variables.items() if k != "perturbations"}


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh variables {'params': ..., 'router_bias': ...} as plain arrays."""
    boxed = jax.jit(init_boxed, static_argnums=0)(cfg, rng)
    with axis_rules(cfg):
        return nn.unbox(boxed)


def logical_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every variable, as a pytree of PartitionSpecs."""
    boxed = jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def _concrete(x) -> np.ndarray | None:
    """x as numpy when its values are known here (not a tracer under a jit/vmap/grad)."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_inputs(cfg: ModelConfig, tokens: jax.Array, positions: jax.Array | None = None) -> None:
    """Raise ValueError unless tokens [B, T] lie in [0, vocab_size) and positions (default
    0..T-1) in [0, max_seq_len); traced values (inside a jit) are skipped, shapes always checked.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if positions is None:
        if tokens.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_seq_len "
                f"{cfg.max_seq_len} (positions 0..T-1 must lie in [0, {cfg.max_seq_len}))"
            )
    elif positions.shape != tokens.shape:
        raise ValueError(f"positions have shape {positions.shape}, tokens {tokens.shape}")
    for name, x, bound, field in (
        ("token ids", tokens, cfg.vocab_size, "vocab_size"),
        ("positions", positions, cfg.max_seq_len, "max_seq_len"),
    ):
        values = None if x is None else _concrete(x)
        if values is None or values.size == 0:
            continue
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= bound:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} must lie in [0, {bound}) (ModelConfig.{field} = {bound}), got {bad}"
            )


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
    Token ids outside [0, vocab_size) and positions outside [0, max_seq_len) raise a
    ValueError (`check_inputs`). Under your own `jax.jit` the values are traced and cannot be
    checked (only the shapes are): there an id in [-vocab_size, 0) wraps around (numpy
    indexing), any other out-of-range id turns its whole row's logits into NaN (attention
    mixes its NaN embedding into every position), and a position past max_seq_len is rotated
    as usual, beyond the lengths the model was built for. Call `model.check_inputs(cfg,
    tokens, positions)` outside the jit to be safe.
    """
    tokens = jnp.asarray(tokens)
    positions = None if positions is None else jnp.asarray(positions)
    check_inputs(cfg, tokens, positions)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    with axis_rules(cfg):
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
    # The input embedding is a lookup, not a matmul; tied, it is also the head, which is one.
    activated = total - (0 if cfg.tie_embeddings else _size(shapes["embed"]))
    if cfg.num_moe_layers:
        routed = _size(shapes["moe_layers"]["moe"]["experts"])
        inactive = cfg.moe.num_experts - cfg.moe.top_k
        activated -= routed * inactive // cfg.moe.num_experts
    return ParamCount(total=total, activated=activated, mtp=mtp)
