"""The reusable training loop: jit once with donation, overlapped metric fetches, held-out
evaluation, orbax checkpoints with exact resume, clean stops on SIGTERM/SIGINT, plots.

Pre-training uses it as is; SFT, RL and distillation pass their own step functions' inputs
(model, loss and optimizer configs) and iterators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from model import ModelConfig
from sharding.mesh import Parallel, ParallelConfig, make_parallel
from sharding.partition import global_batch, init_state_sharded
from train.checkpoint import Checkpointer
from train.flops import flops_per_token
from train.metrics import MetricsWriter, Throughput
from train.optimizer import OptimizerConfig, make_optimizer
from train.state import TrainState
from train.step import LossConfig, NonFinite, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A step produced a non-finite loss or gradient under NonFinite.HALT."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to evaluate, save and log."""

    steps: int = 1000
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    expert_load_every: int = 10  # steps between expert-load heatmap records
    peak_flops: float | None = 165e9  # for MFU; the 2-core CPU's measured f32 matmul peak
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        for name in ("steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoopConfig.{name} = {value!r}: must be an int > 0")
        for name in ("eval_batches", "expert_load_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"LoopConfig.{name} = {value!r}: must be an int >= 0")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"LoopConfig.peak_flops = {self.peak_flops!r}: must be > 0 or None")


@dataclasses.dataclass
class RunResult:
    """What a run ended with (the last train and eval metrics, throughput, why it stopped)."""

    step: int
    interrupted: bool
    train: dict[str, Any]
    eval: dict[str, float]
    wall_s: float
    tokens_per_s: float
    mfu: float | None


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, _frame):
            self.signal = signum

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _host_scalars(metrics: dict) -> dict[str, Any]:
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def evaluate(
    eval_step,
    variables: dict,
    batches: Iterable[dict],
    mtp_weight: float,
    parallel: Parallel | None = None,
) -> dict:
    """Token-weighted held-out CE, mean MTP CE over depths, and their weighted sum.

    With `parallel`, batches are this process's rows of global batches."""
    totals: dict[str, list[float]] = {}
    for batch in batches:
        if parallel is not None:
            batch = global_batch(parallel, batch)
        for name, (total, count) in jax.device_get(eval_step(variables, batch)).items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)
    if not totals:
        return {}
    means = {name: total / max(count, 1.0) for name, (total, count) in totals.items()}
    depths = [v for k, v in means.items() if k.startswith("mtp_")]
    out = {"ce": means["ce"]}
    if depths:
        out["mtp_loss"] = float(np.mean(depths))
    out["loss"] = out["ce"] + mtp_weight * out.get("mtp_loss", 0.0)
    return out


def train(
    run_dir: str | Path,
    *,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    opt_cfg: OptimizerConfig,
    loop_cfg: LoopConfig,
    train_iter: Iterator[dict],
    eval_batches: Callable[[], Iterable[dict]] | None,
    seq_len: int,
    seed: int = 0,
    meta: dict | None = None,
    initial_state: Callable[[TrainState], TrainState] | None = None,
    parallel: Parallel | None = None,
) -> RunResult:
    """Train to loop_cfg.steps, resuming from run_dir/checkpoints when one is there.

    `train_iter` should be a grain iterator (its state is checkpointed); `eval_batches()` yields
    the held-out batches afresh each call. `initial_state(fresh)` may replace the freshly
    initialized state of a new run (e.g. weights from another run's checkpoint). `parallel`
    (default: FSDP over every device) gives the mesh and rules; batches are this process's
    rows, and the state is created, stepped and checkpointed in its shardings.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    optimizer = make_optimizer(opt_cfg)
    schedule = opt_cfg.schedule
    parallel = parallel or make_parallel(ParallelConfig())
    state, shardings = init_state_sharded(model_cfg, optimizer, jax.random.key(seed), parallel)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", every=loop_cfg.checkpoint_every, keep=loop_cfg.keep_checkpoints
    )
    saveable_iter = train_iter if hasattr(train_iter, "get_state") else None
    restored = checkpointer.restore_latest(state, saveable_iter)
    if restored is not None:
        state = restored[0]
        log.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
    elif initial_state is not None:
        state = jax.device_put(initial_state(state), shardings)

    batch_sharding = parallel.batch_sharding()
    train_step = jax.jit(
        make_train_step(model_cfg, loss_cfg, optimizer, schedule),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, parallel.replicated()),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(model_cfg, loss_cfg), in_shardings=(shardings.variables, batch_sharding)
    )
    throughput = Throughput(flops_per_token(model_cfg, seq_len), loop_cfg.peak_flops)
    start_step, stop = int(state.step), StopFlag()
    last_train: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    timed_tokens, timed_seconds = 0.0, 0.0
    wall_start = time.perf_counter()

    def save(state, force=False):
        checkpointer.save(state, saveable_iter, meta, force=force)

    def run_eval(state, step, writer):
        nonlocal last_eval
        if eval_batches is None or loop_cfg.eval_batches == 0:
            return
        mtp_weight = float(loss_cfg.mtp_weight_at(np.int32(step)))
        last_eval = evaluate(eval_step, state.variables, eval_batches(), mtp_weight, parallel)
        writer.write(step, last_eval, prefix="eval/")

    def record(step: int, metrics: dict, seconds: float | None, writer, bar) -> None:
        nonlocal last_train, timed_tokens, timed_seconds
        host = _host_scalars(metrics)
        if not bool(host.pop("finite")) and loss_cfg.nonfinite is NonFinite.HALT:
            raise NonFiniteLossError(
                f"step {step}: loss {float(host['loss'])}, grad norm {float(host['grad_norm'])} "
                f"is not finite; the update was dropped and nothing was saved from it (latest "
                f"checkpoint: {checkpointer.steps()[-1:] or 'none'}). Set "
                "loss.nonfinite=skip to skip such steps instead."
            )
        tokens = float(host["tokens"])
        if seconds is not None:  # untimed: compilation, evaluation or saving in the interval
            timed_tokens += tokens
            timed_seconds += seconds
            host |= throughput.measure(int(tokens), seconds)
        load = host.pop("expert_load", None)
        every = loop_cfg.expert_load_every
        if load is not None and every and (step % every == 0 or step == loop_cfg.steps):
            host["expert_load"] = load
        writer.write(step, host)
        last_train = host
        if bar is not None:
            bar.set_postfix(
                loss=f"{float(host['loss']):.3f}",
                tok_s=f"{host.get('tokens_per_s', 0):.0f}",
                refresh=False,
            )

    interrupted = False
    with MetricsWriter(run_dir) as writer, stop.installed(), parallel.activate():
        bar = None
        if loop_cfg.progress:
            bar = tqdm(total=loop_cfg.steps, initial=start_step, desc="train", unit="step")
        pending = None  # (step, metrics, dispatch time, untimed) of the step before
        try:
            for step in range(start_step + 1, loop_cfg.steps + 1):
                batch = global_batch(parallel, next(train_iter))
                dispatched = time.perf_counter()
                state, metrics = train_step(state, batch)
                if pending is not None:  # fetch step N-1's metrics while step N runs
                    prev_step, prev_metrics, prev_time, untimed = pending
                    record(
                        prev_step,
                        prev_metrics,
                        None if untimed else dispatched - prev_time,
                        writer,
                        bar,
                    )
                pending = (step, metrics, dispatched, step == start_step + 1)
                if bar is not None:
                    bar.update(1)
                # Evaluation and saving run between two steps: leave this step untimed.
                if step % loop_cfg.eval_every == 0 or step == loop_cfg.steps:
                    run_eval(state, step, writer)
                    pending = (*pending[:3], True)
                if checkpointer.due(step):
                    save(state)
                    pending = (*pending[:3], True)
                if stop.signal is not None:
                    log.warning("signal %d: saving step %d and stopping", stop.signal, step)
                    interrupted = True
                    break
            if pending is None:  # resumed a finished run: report its held-out losses again
                run_eval(state, int(state.step), writer)
            else:
                prev_step, prev_metrics, prev_time, untimed = pending
                record(
                    prev_step,
                    prev_metrics,
                    None if untimed else time.perf_counter() - prev_time,
                    writer,
                    bar,
                )
            save(state, force=True)
        finally:
            if bar is not None:
                bar.close()
            checkpointer.close()
    if loop_cfg.plots:
        from train.plots import make_plots

        make_plots(run_dir)
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else 0.0
    mfu = throughput.measure(int(timed_tokens), timed_seconds).get("mfu") if timed_seconds else None
    return RunResult(
        step=int(state.step),
        interrupted=interrupted,
        train=last_train,
        eval=last_eval,
        wall_s=time.perf_counter() - wall_start,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
    )
