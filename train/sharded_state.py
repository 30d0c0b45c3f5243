"""Train states created in their shardings: optimizer moments follow their parameter.

State is created directly on the mesh (`jax.eval_shape` -> logical specs -> mesh shardings ->
`jax.jit(init, out_shardings=...)`), so no device ever holds all parameters. The trainer owns
this (sharding/ knows meshes and logical rules, not train states).
"""

from __future__ import annotations

import functools

import jax
import optax

from model import ModelConfig
from sharding.mesh import Parallel
from sharding.partition import path_keys, variable_shardings
from train.state import TrainState, init_state


def follow_params(param_shardings: dict, opt_state: optax.OptState, parallel: Parallel):
    """NamedShardings of an (abstract) optimizer state: a leaf shaped like a parameter, under
    that parameter's path (mu, nu, ...), takes its sharding; counts and the rest replicate."""
    by_path = {
        path_keys(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
        )
    }
    replicated = parallel.replicated()

    def follow(path, leaf):
        keys = path_keys(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= leaf.ndim:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(follow, opt_state)


def state_shardings(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, parallel: Parallel
) -> TrainState:
    """NamedShardings of every TrainState leaf: optimizer moments follow their parameter."""
    variables = variable_shardings(cfg, parallel)
    abstract = jax.eval_shape(functools.partial(init_state, cfg, optimizer), jax.random.key(0))
    replicated = parallel.replicated()
    return TrainState(
        step=replicated,
        params=variables["params"],
        opt_state=follow_params(variables["params"], abstract.opt_state, parallel),
        router_bias=variables.get("router_bias", {}),
        rng=replicated,
        skipped=replicated,
    )


def init_state_sharded(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, rng: jax.Array, parallel: Parallel
) -> tuple[TrainState, TrainState]:
    """(state created in place on the mesh, its shardings)."""
    shardings = state_shardings(cfg, optimizer, parallel)
    with parallel.activate():
        init = jax.jit(functools.partial(init_state, cfg, optimizer), out_shardings=shardings)
        return init(rng), shardings
