"""Multi-host start-up: join the processes of one run into a single JAX cluster.

Call `initialize()` once, first thing, before any JAX computation. Afterwards
`jax.devices()` lists the devices of every process, `make_parallel` builds a mesh over all of
them, and each process feeds only its own rows of the batch (`sharding.partition.global_batch`).

Where the settings come from, first match wins:
  1. the `DistributedConfig` passed in;
  2. environment variables
       JAXSEEK_COORDINATOR      host:port of process 0's coordinator service, e.g. 10.0.0.1:1234
       JAXSEEK_NUM_PROCESSES    number of processes in the run
       JAXSEEK_PROCESS_ID       this process's index, 0 .. JAXSEEK_NUM_PROCESSES - 1
       JAXSEEK_LOCAL_DEVICE_IDS optional, comma-separated: the local devices this process uses
       JAXSEEK_DISTRIBUTED_AUTO =1: let JAX detect everything (Cloud TPU pods, SLURM, Open MPI)
     (the first three go together: setting only some of them is an error);
  3. nothing: a single-process run, and `initialize()` returns False without touching JAX.
     A SLURM or Open MPI launch of several tasks is not joined silently (a batch script run
     outside `srun` would wait for peers that never start); it is logged with the setting that
     joins it: `DistributedConfig(auto=True)` or JAXSEEK_DISTRIBUTED_AUTO=1.

Two processes on one machine, two simulated CPU devices each (a 4-device mesh), from the
repository root (the two-process test, tests/test_distributed.py, runs exactly this):

    export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2
    export JAXSEEK_COORDINATOR=127.0.0.1:12355 JAXSEEK_NUM_PROCESSES=2
    JAXSEEK_PROCESS_ID=0 python -m tests.distributed_worker &
    JAXSEEK_PROCESS_ID=1 python -m tests.distributed_worker
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXSEEK_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSEEK_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSEEK_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXSEEK_LOCAL_DEVICE_IDS"
ENV_AUTO = "JAXSEEK_DISTRIBUTED_AUTO"

_EXPLICIT = ("coordinator", "num_processes", "process_id")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where this process sits in the run. Set coordinator, num_processes and process_id
    together, or auto=True to have `jax.distributed.initialize()` detect what is unset from
    the cluster (Cloud TPU pod, SLURM, Open MPI). All unset and auto False: one process."""

    coordinator: str | None = None  # "host:port" of process 0, reachable from every process
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False

    def __post_init__(self):
        if self.local_device_ids is not None:
            ids = self.local_device_ids
            if _is_int(ids):
                ids = (ids,)
            elif isinstance(ids, Sequence) and not isinstance(ids, str):
                ids = tuple(ids)
            if not (isinstance(ids, tuple) and ids and all(_is_int(i) and i >= 0 for i in ids)):
                raise ValueError(
                    "DistributedConfig.local_device_ids must be a non-empty sequence of "
                    f"non-negative ints, got {self.local_device_ids!r}"
                )
            object.__setattr__(self, "local_device_ids", ids)
        if not isinstance(self.auto, bool):
            raise ValueError(f"DistributedConfig.auto must be a bool, got {self.auto!r}")
        if self.coordinator is not None:
            host, _, port = str(self.coordinator).rpartition(":")
            if not (isinstance(self.coordinator, str) and host and port.isdigit()):
                raise ValueError(
                    "DistributedConfig.coordinator must be 'host:port' (e.g. '10.0.0.1:1234'), "
                    f"got {self.coordinator!r}"
                )
            if not 0 < int(port) < 65536:
                raise ValueError(
                    "DistributedConfig.coordinator port must be in 1..65535, "
                    f"got {self.coordinator!r}"
                )
        if self.num_processes is not None and not (
            _is_int(self.num_processes) and self.num_processes > 0
        ):
            raise ValueError(
                "DistributedConfig.num_processes must be a positive int, "
                f"got {self.num_processes!r}"
            )
        if self.process_id is not None:
            n = self.num_processes
            ok = (
                _is_int(self.process_id)
                and self.process_id >= 0
                and (n is None or self.process_id < n)
            )
            if not ok:
                valid = "a non-negative int" if n is None else f"in 0..{n - 1} (num_processes={n})"
                raise ValueError(
                    f"DistributedConfig.process_id must be {valid}, got {self.process_id!r}"
                )
        if not self.auto:
            missing = [name for name in _EXPLICIT if getattr(self, name) is None]
            if 0 < len(missing) < len(_EXPLICIT) or (missing and self.local_device_ids):
                given = [
                    n for n in (*_EXPLICIT, "local_device_ids") if getattr(self, n) is not None
                ]
                raise ValueError(
                    f"DistributedConfig: {', '.join(given)} set but {', '.join(missing)} not; "
                    "set coordinator, num_processes and process_id together, or auto=True to "
                    "detect the rest from the cluster"
                )

    @property
    def enabled(self) -> bool:
        """Whether this config asks for a multi-process run at all."""
        return self.auto or self.coordinator is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        """The config that the JAXSEEK_* environment variables describe (empty ones are unset)."""
        env = os.environ if environ is None else environ
        raw = {
            name: (env.get(name) or "").strip() or None
            for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_LOCAL_DEVICE_IDS)
        }
        auto_raw = (env.get(ENV_AUTO) or "").strip().lower()
        if auto_raw not in ("", "0", "1", "true", "false"):
            raise ValueError(f"{ENV_AUTO} must be 0 or 1, got {env.get(ENV_AUTO)!r}")
        auto = auto_raw in ("1", "true")
        explicit = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
        unset = [name for name in explicit if raw[name] is None]
        if not auto and 0 < len(unset) < len(explicit):
            given = [f"{name}={raw[name]}" for name in explicit if raw[name] is not None]
            raise ValueError(
                f"{', '.join(given)} set but {', '.join(unset)} not: set all three for a "
                f"multi-process run (or {ENV_AUTO}=1 to detect the rest), or none of them"
            )

        def integer(name: str) -> int | None:
            if raw[name] is None:
                return None
            try:
                return int(raw[name])
            except ValueError:
                raise ValueError(f"{name} must be an int, got {raw[name]!r}") from None

        ids = raw[ENV_LOCAL_DEVICE_IDS]
        try:
            local_device_ids = None if ids is None else tuple(int(i) for i in ids.split(","))
        except ValueError:
            raise ValueError(
                f"{ENV_LOCAL_DEVICE_IDS} must be comma-separated ints (e.g. 0,1), got {ids!r}"
            ) from None
        return cls(
            coordinator=raw[ENV_COORDINATOR],
            num_processes=integer(ENV_NUM_PROCESSES),
            process_id=integer(ENV_PROCESS_ID),
            local_device_ids=local_device_ids,
            auto=auto,
        )


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """A multi-task SLURM or Open MPI launch seen in the environment ("slurm: 4 tasks"), or None.
    Only environment variables are read: no metadata server or Kubernetes API is queried."""
    env = os.environ if environ is None else environ
    for name, count in (("slurm", "SLURM_NTASKS"), ("open mpi", "OMPI_COMM_WORLD_SIZE")):
        value = env.get(count, "")
        if value.isdigit() and int(value) > 1:
            return f"{name}: {value} tasks"
    return None


def initialize(cfg: DistributedConfig | None = None) -> bool:
    """Join this process to the multi-process run that cfg (default: JAXSEEK_* environment
    variables) describes. True once the run is multi-process (also when it already was: a
    second call does nothing); False, touching nothing, for a single-process run."""
    if jax.distributed.is_initialized():
        return True
    cfg = DistributedConfig.from_env() if cfg is None else cfg
    if not cfg.enabled:
        if cluster := detected_cluster():
            log.warning(
                "%s detected but not joined (single process); set %s=1 or "
                "DistributedConfig(auto=True) to start jax.distributed from it",
                cluster,
                ENV_AUTO,
            )
        return False
    kwargs = dict(
        coordinator_address=cfg.coordinator,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None,
    )
    if not cfg.auto:
        # Everything is explicit: do not let a surrounding SLURM/MPI environment fill in
        # local_device_ids behind the caller's back.
        kwargs["cluster_detection_method"] = "deactivate"
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
