"""From logical axis names to device shardings: parameters, optimizer state, batches.

State is created directly in its shardings (`jax.eval_shape` -> logical specs -> mesh
shardings -> `jax.jit(init, out_shardings=...)`), so no device ever holds all parameters.
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import model
from model import ModelConfig
from sharding.mesh import Parallel
from train.state import TrainState, init_state

log = logging.getLogger(__name__)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def mesh_sharding(
    logical: PartitionSpec, shape: tuple[int, ...], parallel: Parallel, name: str = ""
) -> NamedSharding:
    """The NamedSharding of one array; a dimension the mesh axes do not divide stays whole
    (logged: a model whose sizes the mesh does not divide runs, only less sharded)."""
    spec = nn.logical_to_mesh_axes(tuple(logical), parallel.logical_rules) if logical else ()
    dims = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(parallel.mesh.shape[a] for a in axes)
        if ways > 1 and size % ways:
            log.info(
                "%s: dimension %d not divisible by %s (%d): kept whole", name, size, axes, ways
            )
            axes = ()
        dims.append(axes[0] if len(axes) == 1 else (axes or None))
    return NamedSharding(parallel.mesh, PartitionSpec(*dims))


def variable_shardings(cfg: ModelConfig, parallel: Parallel) -> dict:
    """NamedShardings of the model's variables {'params', 'router_bias'}."""
    logical = model.logical_axes(cfg)
    shapes = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))

    def one(path, spec, leaf):
        return mesh_sharding(spec, leaf.shape, parallel, "/".join(map(str, _keys(path))))

    return jax.tree_util.tree_map_with_path(one, logical, shapes, is_leaf=_is_spec)


def state_shardings(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, parallel: Parallel
) -> TrainState:
    """NamedShardings of every TrainState leaf: optimizer moments follow their parameter."""
    variables = variable_shardings(cfg, parallel)
    abstract = jax.eval_shape(functools.partial(init_state, cfg, optimizer), jax.random.key(0))
    by_path = {
        _keys(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(variables["params"], is_leaf=_is_spec)
    }
    replicated = parallel.replicated()

    def follow_param(path, leaf):
        # An optimizer leaf shaped like a parameter, under that parameter's path (mu, nu, ...).
        keys = _keys(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= leaf.ndim:
                return sharding
        return replicated

    return TrainState(
        step=replicated,
        params=variables["params"],
        opt_state=jax.tree_util.tree_map_with_path(follow_param, abstract.opt_state),
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


def global_batch(parallel: Parallel, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays split over the batch axes."""
    sharding = parallel.batch_sharding()
    for name, rows in local.items():
        global_rows = len(rows) * jax.process_count()
        if global_rows % parallel.batch_size_multiple:
            raise ValueError(
                f"batch '{name}' has {global_rows} rows over all processes: not divisible by "
                f"the {parallel.batch_size_multiple} devices that split the batch "
                f"(mesh {dict(parallel.mesh.shape)}); change the batch size or the mesh"
            )
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
