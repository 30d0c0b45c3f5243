"""Language-model training on the one loop: the jitted next-token step (CE + MTP + balance
loss, router bias update) over grain batches, sharded state, held-out evaluation.

Pre-training, context extension, SFT and logit distillation (SFT with a teacher) call
`train`; GRPO and reward models pass their own step and data to `train.loop.TrainLoop`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from model import ModelConfig
from sharding.mesh import Parallel, ParallelConfig, make_parallel
from sharding.partition import global_batch
from train.flops import flops_per_token
from train.kd import KDConfig
from train.loop import LoopConfig, RunResult, TrainLoop
from train.metrics import Throughput
from train.optimizer import OptimizerConfig, make_optimizer
from train.run_dir import to_json
from train.sharded_state import init_state_sharded
from train.state import TrainState
from train.step import LossConfig, NonFinite, make_eval_step, make_train_step, schedule_step

# Fields of a language-model run's config that may change on resume: the loop's cadence and
# length, and the mesh (checkpoints restore into any sharding). The exchange is how token
# copies travel under EP, micro-batching how a batch's gradient is accumulated: every choice
# gives the same values.
SAFE_FIELDS = (
    "loop",
    "parallel",
    "model.moe.ep_exchange",
    "model.logical_rules",
    "loss.micro_batches",
)
OVERRIDE = "loop.allow_config_change=true (--set loop.allow_config_change=true)"


class NonFiniteLossError(RuntimeError):
    """A step produced a non-finite loss or gradient under NonFinite.HALT."""


def evaluate(
    eval_step,
    variables: dict,
    batches: Iterable[dict],
    mtp_weight: float,
    parallel: Parallel | None = None,
    *,
    teacher: Callable[[dict], dict] | None = None,
    kd_weight: float = 0.0,
) -> dict:
    """Token-weighted held-out CE, mean MTP CE over depths, and their weighted sum; with a
    `teacher` (distillation), the divergence "kd" and the loss (1 - kd_weight) CE + kd_weight kd.

    With `parallel`, batches are this process's rows of global batches."""
    totals: dict[str, list[float]] = {}
    for batch in batches:
        if parallel is not None:
            batch = global_batch(parallel, batch)
        if teacher is not None:
            batch = batch | teacher(batch)
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
    main = out["ce"]
    if "kd" in means:
        out["kd"] = means["kd"]
        main = (1 - kd_weight) * out["ce"] + kd_weight * out["kd"]
    out["loss"] = main + mtp_weight * out.get("mtp_loss", 0.0)
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
    config: Mapping[str, Any] | None = None,
    evaluate_first: bool = False,
    evaluate_more: Callable[[ModelConfig, dict], dict] | None = None,
    kd: KDConfig | None = None,
    teacher: Callable[[dict], dict] | None = None,
) -> RunResult:
    """Train to loop_cfg.steps, resuming from run_dir/checkpoints when one is there.

    `train_iter` should be a grain iterator (its state is checkpointed); `eval_batches()` yields
    the held-out batches afresh each call. `initial_state(fresh)` may replace the freshly
    initialized state of a new run (e.g. weights from another run's checkpoint). `parallel`
    (default: FSDP over every device) gives the mesh and rules; batches are this process's
    rows, and the state is created, stepped and checkpointed in its shardings. `config`: the
    run's whole config as JSON data, guarded against changes (default: the configs given
    here); a rerun that changes a field outside SAFE_FIELDS is refused before anything runs.
    `evaluate_first`: evaluate before the first step too; `evaluate_more(cfg, variables)`:
    more held-out metrics at each evaluation (e.g. greedy task scores), logged beside the
    losses. `kd` and `teacher` (train/kd.py: `teacher(global batch)` gives the teacher's
    outputs) distil into the model; without `teacher`, the batches carry them (precomputed).
    """
    if teacher is not None and kd is None:
        raise ValueError("train: a teacher needs kd (the distillation loss)")
    if config is None:
        config = {
            "model": to_json(model_cfg),
            "loss": to_json(loss_cfg),
            "optimizer": to_json(opt_cfg),
            "loop": to_json(loop_cfg),
            "seq_len": seq_len,
            "seed": seed,
        }
    loop = TrainLoop(
        run_dir, loop_cfg, config=config, safe=SAFE_FIELDS, override=OVERRIDE, meta=meta
    )
    optimizer = make_optimizer(opt_cfg)
    parallel = parallel or make_parallel(ParallelConfig())
    model_cfg = parallel.configure(model_cfg)  # config.json keeps the user's config
    state, shardings = init_state_sharded(model_cfg, optimizer, jax.random.key(seed), parallel)
    state, _, resumed = loop.resume(state, data=train_iter)
    if not resumed and initial_state is not None:
        state = jax.device_put(initial_state(state), shardings)

    batch_sharding = parallel.batch_sharding()
    train_step = jax.jit(
        make_train_step(model_cfg, loss_cfg, optimizer, opt_cfg.schedule, kd),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, parallel.replicated()),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(model_cfg, loss_cfg, kd),
        in_shardings=(shardings.variables, batch_sharding),
    )

    def step_fn(state: TrainState, step: int):
        batch = global_batch(parallel, next(train_iter))
        if teacher is not None:
            batch = batch | teacher(batch)
        return train_step(state, batch)

    def run_eval(state: TrainState, step: int) -> dict:
        metrics = {}
        if eval_batches is not None and loop_cfg.eval_batches > 0:
            mtp_weight = float(loss_cfg.mtp_weight_at(schedule_step(state)))
            metrics = evaluate(
                eval_step, state.variables, eval_batches(), mtp_weight, parallel,
                teacher=teacher, kd_weight=0.0 if kd is None else kd.weight,
            )  # fmt: skip
        if evaluate_more is not None:
            metrics |= evaluate_more(model_cfg, state.variables)
        return metrics

    def check(step: int, host: dict) -> dict:
        if not bool(host.pop("finite")) and loss_cfg.nonfinite is NonFinite.HALT:
            saved = loop.checkpointer.steps()[-1:] or "none"
            raise NonFiniteLossError(
                f"step {step}: loss {float(host['loss'])}, grad norm {float(host['grad_norm'])} "
                f"is not finite; the update was dropped and nothing was saved from it (latest "
                f"checkpoint: {saved}). Set loss.nonfinite=skip to skip such steps instead."
            )
        load = host.pop("expert_load", None)
        every = loop_cfg.expert_load_every
        if load is not None and every and (step % every == 0 or step == loop_cfg.steps):
            host["expert_load"] = load
        return host

    def postfix(host: dict) -> dict:
        return {"loss": f"{float(host['loss']):.3f}", "tok_s": f"{host.get('tokens_per_s', 0):.0f}"}

    return loop.run(
        state,
        step_fn,
        data=train_iter,
        evaluate=run_eval,
        check=check,
        throughput=Throughput(flops_per_token(model_cfg, seq_len), loop_cfg.peak_flops),
        postfix=postfix,
        parallel=parallel,
        evaluate_first=evaluate_first,
    )
