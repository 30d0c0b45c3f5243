"""One process of the two-process test (tests/test_distributed.py): 3 FSDP train steps on a
mesh over every device of every process, each process feeding only its rows of the batch.

    python -m tests.distributed_worker --coordinator 127.0.0.1:PORT --num-processes 2 \\
        --process-id I     # one of the run's processes (or JAXSEEK_* variables, no flags)
    python -m tests.distributed_worker --single   # the same steps on one device, no cluster

Process 0 (and --single) prints `LOSSES [l0, l1, l2]`; any exception exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import jax
import numpy as np

from sharding.distributed import DistributedConfig, initialize

B, L, STEPS = 8, 16, 3


def _rows(step: int, vocab_size: int) -> dict[str, np.ndarray]:
    """The global packed rows [B, L+1] of one step: the same in every process."""
    from train.packing import TOKENS

    tokens = np.random.default_rng(step).integers(0, vocab_size, (B, L + 1), np.int32)
    return {
        TOKENS: tokens,
        f"{TOKENS}_segment_ids": np.ones_like(tokens),
        f"{TOKENS}_positions": np.broadcast_to(np.arange(L + 1, dtype=np.int32), tokens.shape),
    }


def run(single: bool) -> list[float]:
    """Per-step losses of STEPS train steps on this run's mesh."""
    # Imported after initialize(): nothing may touch a JAX backend before it.
    from sharding.mesh import ParallelConfig, make_parallel
    from sharding.partition import global_batch
    from tests.conftest import tiny_config
    from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
    from train.packing import to_batch
    from train.sharded_state import init_state_sharded
    from train.step import LossConfig, make_train_step

    cfg = tiny_config(d_model=64, vocab_size=128)
    schedule = LRSchedule(peak_lr=1e-2, warmup_steps=1)
    optimizer = make_optimizer(OptimizerConfig(schedule=schedule))
    if single:
        parallel = make_parallel(ParallelConfig(fsdp=1), devices=jax.devices()[:1])
    else:
        parallel = make_parallel(ParallelConfig(fsdp=None))
    cfg = parallel.configure(cfg)
    state, shardings = init_state_sharded(cfg, optimizer, jax.random.key(0), parallel)
    step = jax.jit(
        make_train_step(cfg, LossConfig(), optimizer, schedule),
        in_shardings=(shardings, parallel.batch_sharding()),
        out_shardings=(shardings, parallel.replicated()),
    )
    # Each process loads only its contiguous block of rows; global_batch places them.
    per_process = B // jax.process_count()
    mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    losses = []
    with parallel.activate():
        for i in range(STEPS):
            rows = {k: v[mine] for k, v in _rows(i, cfg.vocab_size).items()}
            state, metrics = step(
                state, global_batch(parallel, to_batch(rows, mask_documents=False))
            )
            losses.append(float(metrics["loss"]))
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", action="store_true", help="one device, no cluster")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    if not args.single:
        explicit = args.coordinator or args.num_processes is not None
        dist = (
            DistributedConfig(args.coordinator, args.num_processes, args.process_id)
            if explicit
            else None  # JAXSEEK_* environment variables
        )
        if not initialize(dist):
            raise RuntimeError("no multi-process settings: pass --coordinator etc. or --single")
        assert initialize(dist), "a second initialize() is a no-op that still reports True"
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local, {jax.device_count()} global devices",
        flush=True,
    )
    losses = run(args.single)
    if jax.process_index() == 0:
        print("LOSSES " + json.dumps(losses), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit: a plain exit would wait in jax.distributed's shutdown barrier for the peer.
        os._exit(1)
