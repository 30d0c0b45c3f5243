"""The one training loop: run-dir guard, resume, checkpoint cadence, metrics, held-out
evaluation cadence, clean stops on SIGTERM/SIGINT, progress, throughput and plots.

Each trainer drives it with its own step function and data source, and owns nothing of the
loop itself:

    loop = TrainLoop(run_dir, loop_cfg, config=to_json(cfg), safe=("loop",), override=...)
    state, extra = loop.resume(fresh_state, data=iterator, extra={"ref": ref})
    result = loop.run(state, step_fn, data=iterator, evaluate=eval_fn)

Pre-training (train/lm_train.py) passes a jitted step over grain batches; GRPO (rl/grpo.py)
a rollout + update step over its task order, with the reference policy as `extra`. A step
function returns `(state, metrics)`; metrics may be device arrays: they are fetched after the
next step is dispatched, so the host never stalls the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from sharding.mesh import Parallel
from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter, Throughput, read_metrics
from train.run_dir import check_run_dir, write_config
from train.state import TrainState

log = logging.getLogger(__name__)

StepFn = Callable[[TrainState, int], tuple[TrainState, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to evaluate, save and log. Every field may change
    when a run resumes; allow_config_change also lets the other parts of a run's config
    change (see train/run_dir.py)."""

    steps: int = 1000
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    expert_load_every: int = 10  # steps between expert-load heatmap records
    peak_flops: float | None = 165e9  # for MFU; the 2-core CPU's measured f32 matmul peak
    progress: bool = True
    plots: bool = True
    allow_config_change: bool = False

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
    """What a run ended with: the last train and eval metrics, why it stopped, and its
    throughput over the timed steps (timed_tokens in timed_s; compilation, evaluation and
    saving excluded)."""

    step: int
    interrupted: bool
    train: dict[str, Any]
    eval: dict[str, float]
    wall_s: float
    tokens_per_s: float
    mfu: float | None
    timed_tokens: float = 0.0
    timed_s: float = 0.0


class Interrupted(Exception):
    """A run stopped early on SIGTERM/SIGINT (its state saved): a multi-stage experiment
    raises this rather than go on to its next stage with an unfinished one."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = run_dir
        super().__init__(
            f"{run_dir} stopped on a signal before its last step (its checkpoint is saved); "
            "rerun the same command to resume"
        )


def check_finished(interrupted: bool, run_dir: str | Path) -> None:
    """Raise Interrupted if the run in run_dir stopped early."""
    if interrupted:
        raise Interrupted(run_dir)


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


def host_scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A step's metrics fetched to the host as numpy values (waits for the step)."""
    return {k: np.asarray(v) for k, v in jax.device_get(dict(metrics)).items()}


class _Clock:
    """Seconds per step between completions: a step's interval runs from the previous step's
    completion (or the end of the untimed work after it) to its own, so compilation,
    evaluation and saving are never counted, and nothing of a step is left out."""

    def __init__(self, throughput: Throughput | None):
        self.throughput = throughput
        self.anchor: float | None = None  # None: the next interval holds compilation
        self.tokens = 0.0
        self.seconds = 0.0

    def lap(self, host: dict, done_by: float | None = None) -> dict:
        """Close the interval of the step whose metrics are `host`; `done_by`: a time by
        which it is known to have completed (default: now, after fetching its metrics)."""
        now = time.perf_counter() if done_by is None else done_by
        if self.anchor is not None and self.throughput is not None and "tokens" in host:
            seconds = now - self.anchor
            self.tokens += float(host["tokens"])
            self.seconds += seconds
            host = host | self.throughput.measure(int(host["tokens"]), seconds)
        self.anchor = now
        return host

    def restart(self) -> None:
        """After untimed work (evaluation, saving): the next interval starts now."""
        if self.anchor is not None:
            self.anchor = time.perf_counter()

    def totals(self) -> tuple[float, float | None]:
        if not self.seconds or self.throughput is None:
            return 0.0, None
        measured = self.throughput.measure(int(self.tokens), self.seconds)
        return measured["tokens_per_s"], measured.get("mfu")


class TrainLoop:
    """One run dir's loop. Construction checks the run dir (`check_run_dir`: a config that
    differs outside `safe` is refused before anything is written) and opens its
    checkpoints; `resume` restores, then writes config.json; `run` trains to
    loop_cfg.steps."""

    def __init__(
        self,
        run_dir: str | Path,
        loop_cfg: LoopConfig,
        *,
        config: Mapping[str, Any],
        safe: Collection[str],
        override: str,
        meta: dict | None = None,
        desc: str = "train",
    ):
        self.run_dir = Path(run_dir)
        self.cfg = loop_cfg
        self.config = dict(config)
        self.changes = check_run_dir(
            self.run_dir,
            config,
            safe=safe,
            allow_change=loop_cfg.allow_config_change,
            override=override,
        )
        self.meta = dict(meta or {})
        self.desc = desc
        self._written = False
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            every=loop_cfg.checkpoint_every,
            keep=loop_cfg.keep_checkpoints,
        )

    def resume(
        self, state: TrainState, *, data: Any | None = None, extra: Any | None = None
    ) -> tuple[TrainState, Any, bool]:
        """(state, extra, resumed): the newest checkpoint's, shaped and sharded like the given
        ones (the data iterator restored in place), or the given ones when there is none."""
        restored = self.checkpointer.restore_latest(state, _saveable(data), extra_like=extra)
        self._write_config()  # the checkpoints fit this config (or there are none)
        if restored is None:
            return state, extra, False
        log.info("resumed from step %d in %s", int(restored.state.step), self.run_dir)
        return restored.state, restored.extra, True

    def run(
        self,
        state: TrainState,
        step_fn: StepFn,
        *,
        data: Any | None = None,
        extra: Callable[[], Any] | None = None,
        evaluate: Callable[[TrainState, int], dict] | None = None,
        evaluate_first: bool = False,
        check: Callable[[int, dict], dict] | None = None,
        throughput: Throughput | None = None,
        postfix: Callable[[dict], dict] | None = None,
        parallel: Parallel | None = None,
    ) -> RunResult:
        """Step from state.step to loop_cfg.steps, then save; returns the run's result.

        data: the checkpointable iterator step_fn reads (saved with each checkpoint);
        extra(): a pytree saved beside the state (e.g. GRPO's reference policy);
        evaluate(state, step): held-out metrics (logged under eval/) every eval_every steps,
        at the last step, before the first step with evaluate_first, and again when a finished
        run is resumed; check(step, host metrics): the record to log (may raise to halt);
        throughput: tokens/s and MFU from each step's `tokens` metric; postfix(record): the
        progress bar's fields; parallel: the mesh and rules the steps run under."""
        self._write_config()
        cfg, checkpointer = self.cfg, self.checkpointer
        start, stop, clock = int(state.step), StopFlag(), _Clock(throughput)
        last_train: dict[str, Any] = {}
        last_eval: dict[str, float] = {}
        wall_start = time.perf_counter()
        interrupted = False

        def save(state, force=False):
            payload = extra() if extra is not None else None
            checkpointer.save(state, _saveable(data), self.meta, force=force, extra=payload)

        def run_eval(state, step, writer):
            nonlocal last_eval
            if evaluate is not None:
                metrics = evaluate(state, step)
                if metrics:
                    last_eval = metrics
                    writer.write(step, metrics, prefix="eval/")

        def flush(pending, writer, bar, done_by=None):
            nonlocal last_train
            step, metrics = pending
            host = clock.lap(host_scalars(metrics), done_by)
            if check is not None:
                host = check(step, host)
            writer.write(step, host)
            last_train = host
            if bar is not None and postfix is not None:
                bar.set_postfix(postfix(host), refresh=False)

        active = parallel.activate() if parallel is not None else contextlib.nullcontext()
        with MetricsWriter(self.run_dir) as writer, stop.installed(), active:
            bar = None
            if cfg.progress:
                bar = tqdm(total=cfg.steps, initial=start, desc=self.desc, unit="step")
            pending = None  # the step before, whose metrics are fetched after this one starts
            try:
                if evaluate_first and start == 0:
                    run_eval(state, 0, writer)
                for step in range(start + 1, cfg.steps + 1):
                    # A step whose outputs are ready before the next dispatch (a backend that
                    # runs synchronously, a host-side step) ended by then: its interval ends
                    # there, not when the host gets round to fetching it.
                    dispatched = time.perf_counter()
                    done = pending is not None and _ready(pending[1])
                    state, metrics = step_fn(state, step)
                    if pending is not None:
                        flush(pending, writer, bar, dispatched if done else None)
                    pending = (step, metrics)
                    if bar is not None:
                        bar.update(1)
                    eval_due = step % cfg.eval_every == 0 or step == cfg.steps
                    if eval_due or checkpointer.due(step) or stop.signal is not None:
                        flush(pending, writer, bar)  # time this step before the untimed work
                        pending = None
                        if eval_due:
                            run_eval(state, step, writer)
                        if checkpointer.due(step):
                            save(state)
                        clock.restart()
                    if stop.signal is not None:
                        log.warning("signal %d: saving step %d and stopping", stop.signal, step)
                        interrupted = True
                        break
                if pending is not None:
                    flush(pending, writer, bar)
                if start >= cfg.steps:  # resumed a finished run: report its held-out scores
                    run_eval(state, start, writer)
                save(state, force=True)
            finally:
                if bar is not None:
                    bar.close()
                checkpointer.close()
        if cfg.plots:
            from train.plots import make_plots

            make_plots(self.run_dir)
        tokens_per_s, mfu = clock.totals()
        if start >= cfg.steps:  # nothing ran: report what the finished run logged
            last_train, tokens_per_s, mfu = _logged(self.run_dir)
        return RunResult(
            step=int(state.step),
            interrupted=interrupted,
            train=last_train,
            eval=last_eval,
            wall_s=time.perf_counter() - wall_start,
            tokens_per_s=tokens_per_s,
            mfu=mfu,
            timed_tokens=clock.tokens,
            timed_s=clock.seconds,
        )

    def _write_config(self) -> None:
        if not self._written:
            write_config(self.run_dir, self.config, self.changes)
            self._written = True


def _logged(run_dir: Path) -> tuple[dict[str, Any], float, float | None]:
    """(last train record, mean logged tokens/s, mean logged MFU) of a run's metrics."""
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    mfus = [r["mfu"] for r in records if r.get("mfu") is not None]
    last = records[-1] if records else {}
    return last, float(np.mean(rates)) if rates else 0.0, float(np.mean(mfus)) if mfus else None


def _ready(metrics: Mapping[str, Any]) -> bool:
    """Whether every device array of a step's metrics has been computed (host values are)."""
    return all(x.is_ready() for x in jax.tree.leaves(dict(metrics)) if isinstance(x, jax.Array))


def _saveable(data: Any | None) -> Any | None:
    # Only iterators with a state (grain's) are checkpointed; plain ones restart.
    return data if hasattr(data, "get_state") else None
