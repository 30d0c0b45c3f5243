"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

import model
from model import ModelConfig


@struct.dataclass
class TrainState:
    """step: updates taken (int32); params / opt_state: optimized weights and AdamW state;
    router_bias: the MoE correction biases (moved by the load rule, not by gradients);
    rng: a key for stochastic parts; skipped: steps whose update was dropped (non-finite)."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    router_bias: dict
    rng: jax.Array
    skipped: jax.Array

    @property
    def variables(self) -> dict:
        """The model's variables dict for `model.forward`."""
        return {"params": self.params, "router_bias": self.router_bias}


def init_state(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Fresh parameters, optimizer state and zero router biases."""
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(cfg, init_rng)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        router_bias=variables.get("router_bias", {}),
        rng=state_rng,
        skipped=jnp.zeros((), jnp.int32),
    )
