"""Scalar reward-model training as a function of one config, on the one training loop.

    base (a jaxseek run dir or a Hugging Face checkpoint) + preference pairs
      -> rendered chosen / rejected rows (rl/reward_data.py)
      -> backbone + scalar head at the last token, Bradley-Terry loss (rl/reward_model.py)
      -> train.loop.TrainLoop: checkpoints, exact resume, metrics, held-out accuracy, plots

The V3 report gives no reward-model hyperparameters; the defaults follow Llama 2's reward
models (one epoch, peak learning rate 1e-5 on a cosine to 10% of it, 3% warmup): more epochs
overfit preference data. The router biases of an MoE backbone stay as the base left them.
rl/reward_eval.py reads a trained model back and scores it on pairs; rl/model_rewards.py
turns it into a reward function.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import ModelConfig
from rl import reward_data, reward_model
from rl.preferences import Pair
from rl.reward_data import PairDataConfig
from rl.reward_eval import pair_accuracy
from rl.reward_model import RewardLossConfig
from sharding.mesh import Parallel, ParallelConfig, make_parallel
from sharding.partition import global_batch, variable_shardings
from train.chat import save_for_transformers
from train.data import TOKENIZER_FILE
from train.flops import flops_per_token
from train.lm_train import NonFiniteLossError
from train.loop import LoopConfig, TrainLoop
from train.metrics import Throughput, read_metrics
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.run_dir import check_run_dir, to_json
from train.sft import load_base
from train.sharded_state import follow_params
from train.state import TrainState
from train.step import apply_update

log = logging.getLogger(__name__)

SAFE_FIELDS = ("loop", "parallel", "model.moe.ep_exchange", "model.logical_rules")
OVERRIDE = "loop.allow_config_change=true (--set loop.allow_config_change=true)"


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """A reward-model run: the base, the pairs, the loss, the schedule, the loop, the mesh."""

    init_from: str | None = None  # a jaxseek run dir: its model, tokenizer and latest weights
    hf_checkpoint: str | None = None  # or a Hugging Face dir
    data: PairDataConfig = dataclasses.field(default_factory=PairDataConfig)
    loss: RewardLossConfig = dataclasses.field(default_factory=RewardLossConfig)
    epochs: float | None = 1.0  # they set the steps (None: loop.steps does)
    peak_lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.03
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loop: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(eval_every=50))
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    seed: int = 0

    def __post_init__(self):
        if self.init_from is not None and self.hf_checkpoint is not None:
            raise ValueError(
                "RewardModelConfig: set one of init_from (a run dir) and hf_checkpoint"
            )
        if self.optimizer.schedule != LRSchedule():
            raise ValueError(
                "RewardModelConfig.optimizer.schedule is built from peak_lr, min_lr_ratio, "
                "warmup_fraction and the run's length; set those instead"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"RewardModelConfig.epochs = {self.epochs!r}: must be > 0 or None")
        if not self.peak_lr > 0:
            raise ValueError(f"RewardModelConfig.peak_lr = {self.peak_lr!r}: must be > 0")
        for name in ("min_lr_ratio", "warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"RewardModelConfig.{name} = {getattr(self, name)!r}: in [0, 1]")

    def schedule(self, steps: int) -> LRSchedule:
        warmup = math.floor(self.warmup_fraction * steps)
        return LRSchedule(
            peak_lr=self.peak_lr,
            warmup_steps=warmup,
            decay_steps=max(steps - warmup, 1),
            min_lr=self.min_lr_ratio * self.peak_lr,
            final_lr=self.min_lr_ratio * self.peak_lr,
        )


def _param_shardings(cfg: ModelConfig, parallel: Parallel) -> tuple[dict, dict]:
    variables = variable_shardings(cfg, parallel)
    head = {"w": parallel.replicated(), "b": parallel.replicated()}
    return {"backbone": variables["params"], "head": head}, variables.get("router_bias", {})


def initial_state(
    cfg: ModelConfig,
    base: dict,
    optimizer: optax.GradientTransformation,
    seed: int,
    parallel: Parallel,
) -> tuple[TrainState, TrainState]:
    """(the reward model's fresh train state on the mesh: the base's weights and router biases,
    a new head; its shardings)."""
    params_sh, bias_sh = _param_shardings(cfg, parallel)
    rng = jax.random.key(seed)
    abstract = jax.eval_shape(lambda: reward_model.init_params(cfg, base["params"], rng))
    replicated = parallel.replicated()
    shardings = TrainState(
        step=replicated,
        params=params_sh,
        opt_state=follow_params(params_sh, jax.eval_shape(optimizer.init, abstract), parallel),
        router_bias=bias_sh,
        rng=replicated,
        skipped=replicated,
    )

    def build(backbone, router_bias):
        params = reward_model.init_params(cfg, backbone, rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            router_bias=router_bias,
            rng=jax.random.fold_in(rng, 1),
            skipped=jnp.zeros((), jnp.int32),
        )

    # Copies: the step donates the state's buffers, and the caller keeps the base.
    base = jax.tree.map(
        jnp.copy, {"params": base["params"], "router_bias": base.get("router_bias", {})}
    )
    with parallel.activate():
        state = jax.jit(build, out_shardings=shardings)(base["params"], base["router_bias"])
    return state, shardings


def make_reward_step(
    cfg: ModelConfig,
    loss_cfg: RewardLossConfig,
    optimizer: optax.GradientTransformation,
    schedule: LRSchedule,
):
    """A pure `step(state, batch) -> (state, metrics)` on a batch of pairs."""

    def loss_fn(params, router_bias, batch):
        return reward_model.objective(cfg, loss_cfg, params, router_bias, batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, metrics), grads = grad_fn(state.params, state.router_bias, batch)
        new_state, updated = apply_update(state, loss, grads, optimizer, schedule)
        tokens = (batch["segment_ids"] != 0).sum().astype(jnp.float32)
        return new_state, metrics | updated | {"tokens": tokens}

    return step


def _checked(step: int, host: dict, loop: TrainLoop) -> dict:
    host = {k: np.asarray(v).item() for k, v in host.items()}
    if not host.pop("finite"):
        saved = loop.checkpointer.steps()[-1:] or "none"
        raise NonFiniteLossError(
            f"step {step}: loss {host['loss']}, grad norm {host['grad_norm']} is not finite; "
            f"the update was dropped and nothing was saved from it (latest checkpoint: {saved})"
        )
    return host


def train_reward_model(
    config: RewardModelConfig, run_dir: str | Path, *, pairs: Sequence[Pair] | None = None
) -> dict[str, Any]:
    """Train (or resume) a scalar reward model in run_dir on config.data.path or `pairs`;
    returns the summary (also written to summary.json): held-out pairwise accuracy before
    and after, per kind, the data's counts."""
    run_dir = Path(run_dir)
    cfg, base, tokenizer = load_base(
        config.init_from, config.hf_checkpoint, what="RewardModelConfig"
    )
    run_config = {**to_json(config), "model": to_json(cfg)}
    check_run_dir(  # before anything is written
        run_dir, run_config, safe=SAFE_FIELDS, allow_change=config.loop.allow_config_change,
        override=OVERRIDE,
    )  # fmt: skip
    if config.data.seq_len > cfg.max_seq_len:
        raise ValueError(
            f"RewardModelConfig: data.seq_len {config.data.seq_len} exceeds the base model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    data = reward_data.prepare(config.data, tokenizer, pairs)
    hosts = jax.process_count()
    steps = config.loop.steps
    if config.epochs is not None:
        per_step = config.data.batch_pairs * hosts
        steps = max(math.ceil(config.epochs * len(data.train) / per_step), 1)
    log.info("reward model: %d steps; %s", steps, data.stats)
    loop_cfg = dataclasses.replace(config.loop, steps=steps)
    loop = TrainLoop(
        run_dir, loop_cfg, config=run_config, safe=SAFE_FIELDS, override=OVERRIDE,
        meta={"config": run_config, "data": data.stats}, desc="reward model",
    )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / TOKENIZER_FILE).exists():
        save_for_transformers(tokenizer, run_dir, config.data.layout)

    parallel = make_parallel(config.parallel)
    cfg = parallel.configure(cfg)
    schedule = config.schedule(steps)
    optimizer = make_optimizer(dataclasses.replace(config.optimizer, schedule=schedule))
    state, shardings = initial_state(cfg, base, optimizer, config.seed, parallel)
    train_iter = reward_data.train_iterator(
        config.data, data, shard_index=jax.process_index(), shard_count=hosts
    )
    state, _, _ = loop.resume(state, data=train_iter)
    batch_sharding = parallel.batch_sharding()
    step = jax.jit(
        make_reward_step(cfg, config.loss, optimizer, schedule),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, parallel.replicated()),
        donate_argnums=0,
    )

    def step_fn(state: TrainState, _step: int):
        return step(state, global_batch(parallel, next(train_iter)))

    def evaluate(state: TrainState, _step: int) -> dict:
        return pair_accuracy(
            cfg, state.params, state.router_bias, config.data, data.heldout, parallel
        )

    def postfix(host: dict) -> dict:
        return {"loss": f"{float(host['loss']):.3f}", "acc": f"{float(host['accuracy']):.2f}"}

    result = loop.run(
        state,
        step_fn,
        data=train_iter,
        evaluate=evaluate,
        evaluate_first=True,
        check=lambda step, host: _checked(step, host, loop),
        throughput=Throughput(flops_per_token(cfg, config.data.seq_len), loop_cfg.peak_flops),
        postfix=postfix,
        parallel=parallel,
    )
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    before = evals[0] if evals and evals[0]["step"] == 0 else {}
    summary = {
        "steps": result.step,
        "interrupted": result.interrupted,
        "train_loss": float(result.train.get("loss", float("nan"))),
        "heldout_accuracy_before": before.get("eval/accuracy"),
        **{f"heldout_{k}": v for k, v in result.eval.items()},
        "tokens_per_s": round(result.tokens_per_s, 1),
        **data.stats,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
