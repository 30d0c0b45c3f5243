"""The device mesh of an experiment: sizes of `data`, `fsdp`, `expert`, `tensor`, the mesh
context jitted code is traced under (jit keys on it), and the logical-axis rules handed to the
model as a static config field (`Parallel.configure`: ModelConfig.logical_rules), so that a
function jitted under one set of rules never silently keeps them under another. How expert
parallelism moves tokens is the model's choice too: MoEConfig.ep_exchange."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from model import ModelConfig
from sharding.rules import BATCH_AXES, Rules

AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh axis sizes and the rule preset. fsdp None takes every device the other axes leave
    (so the default is plain FSDP over all devices, and nothing at all on one device)."""

    data: int = 1
    fsdp: int | None = None
    expert: int = 1
    tensor: int = 1
    rules: Rules = Rules.FSDP

    def __post_init__(self):
        for name in ("data", "expert", "tensor") + (() if self.fsdp is None else ("fsdp",)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ParallelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.rules, Rules):
            raise ValueError(f"ParallelConfig.rules must be a Rules, got {self.rules!r}")

    def shape(self, num_devices: int) -> tuple[int, int, int, int]:
        """(data, fsdp, expert, tensor) for this many devices, or a ValueError saying why not."""
        fixed = self.data * self.expert * self.tensor
        fsdp = self.fsdp if self.fsdp is not None else num_devices // fixed
        if fsdp == 0 or fixed * fsdp != num_devices:
            raise ValueError(
                f"ParallelConfig data={self.data} x fsdp={self.fsdp} x expert={self.expert} x "
                f"tensor={self.tensor} does not fit {num_devices} devices"
            )
        return self.data, fsdp, self.expert, self.tensor


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A mesh and its rules: what the train step, init and generation run under."""

    mesh: Mesh
    rules: Rules

    @property
    def logical_rules(self) -> tuple:
        return self.rules.table()

    def configure(self, cfg: ModelConfig) -> ModelConfig:
        """cfg laid out by these rules (ModelConfig.logical_rules): what the model traces with."""
        return cfg.replace(logical_rules=self.logical_rules)

    @contextlib.contextmanager
    def activate(self):
        """Trace and run jitted code in here: the mesh is current. The model reads its rules
        from its config (`configure`), not from this context."""
        with jax.set_mesh(self.mesh):
            yield self

    @property
    def batch_size_multiple(self) -> int:
        """Global batch sizes must be a multiple of this (the devices splitting the batch)."""
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) dimension over data/fsdp/expert, the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def make_parallel(cfg: ParallelConfig, devices=None) -> Parallel:
    """The mesh of cfg over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.shape(len(devices))
    mesh = jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    return Parallel(mesh=mesh, rules=cfg.rules)
