"""From logical axis names to device shardings: model variables and batches.

Train states (optimizer moments, step, RNG) are the trainer's: `train/sharded_state.py`
builds their shardings from `variable_shardings`.
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import model
from model import ModelConfig
from sharding.mesh import Parallel

log = logging.getLogger(__name__)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def path_keys(path) -> tuple:
    """A pytree key path as plain keys ('params', 'layer_0', 'kernel')."""
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
        return mesh_sharding(spec, leaf.shape, parallel, "/".join(map(str, path_keys(path))))

    return jax.tree_util.tree_map_with_path(one, logical, shapes, is_leaf=_is_spec)


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
