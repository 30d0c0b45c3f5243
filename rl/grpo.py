"""GRPO training (DeepSeekMath, R1): sample G completions per prompt, score them with rule-based
rewards, normalize rewards within each group, and take `mu` clipped policy-gradient steps on
the batch, with a k3 KL penalty to a reference policy refreshed every N steps.

    result = train_grpo(run_dir, cfg=cfg, tokenizer=tok, variables=base,
                        reward={integer_accuracy: 1.0, format_reward: 1.0},
                        train_tasks=train, eval_tasks=heldout,
                        eval_fns={"accuracy": integer_accuracy}, config=GRPOConfig(steps=100))

Rollouts go through `model.generate`'s jitted core (rl/rollout.py); a step is rl/grpo_step.py.
Runs are deterministic given the seed, so a resumed run continues exactly: checkpoints hold
the train state and the reference policy, and the task order and sampling keys follow from
the step number. Metrics go to run_dir/metrics.jsonl and TensorBoard, plots to
run_dir/plots (rewards, held-out scores, completion length), as in pre-training.

Router biases stay as the base left them (no load balancing in RL), the MTP modules are not
trained, and the run uses one device (the sharded pre-training loop is not used here yet).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from model import ModelConfig
from model.sampling import Sampling
from rl.evaluate import evaluate_policy
from rl.grpo_loss import GRPOLossConfig
from rl.grpo_step import GRPOStep
from rl.rewards import RewardFn, Weighted
from rl.rollout import row_length
from train.checkpoint import Checkpointer
from train.loop import StopFlag
from train.metrics import MetricsWriter, read_metrics
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.pretrain import to_json
from train.state import TrainState
from train.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _positive_int(obj, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int > 0, got {value!r}")


def constant_lr(lr: float) -> OptimizerConfig:
    """AdamW at a constant learning rate, no weight decay."""
    return OptimizerConfig(
        schedule=LRSchedule(peak_lr=lr, warmup_steps=0, min_lr=lr, final_lr=lr), weight_decay=0.0
    )


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run. R1-Zero (PAPER_FACTS.md): G 16, 32 prompts per step, lr 3e-6, beta
    0.001, temperature 1, the reference refreshed every 400 steps; the defaults here are sized
    for small models on one machine."""

    loss: GRPOLossConfig = dataclasses.field(default_factory=GRPOLossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: constant_lr(1e-5))
    steps: int = 100  # rollout batches
    prompts_per_step: int = 16
    group_size: int = 8  # G
    mu: int = 1  # policy updates per rollout batch
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    ref_refresh_every: int | None = None  # steps; None: the reference stays the initial policy
    eval_every: int = 20
    eval_max_new_tokens: int | None = None  # None: max_new_tokens
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "mu", "max_new_tokens", "eval_every"):
            _positive_int(self, name)
        for name in ("checkpoint_every", "keep_checkpoints"):
            _positive_int(self, name)
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be an int >= 2, got {self.group_size!r}")
        if not isinstance(self.temperature, int | float) or self.temperature <= 0:
            raise ValueError(
                f"GRPOConfig.temperature must be > 0 (rollouts sample), got {self.temperature!r}"
            )
        if self.ref_refresh_every is not None:
            _positive_int(self, "ref_refresh_every")
        if self.eval_max_new_tokens is not None:
            _positive_int(self, "eval_max_new_tokens")
        self.sampling  # noqa: B018  (validates top_p / top_k)

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclasses.dataclass
class GRPOResult:
    """Where a run ended: its last step's metrics, the held-out scores before the first step
    (read back from the metrics when resumed) and after the last, and the wall time of this
    call."""

    step: int
    interrupted: bool
    train: dict[str, float]
    eval: dict[str, float]
    eval_before: dict[str, float]
    wall_s: float


def task_order(step: int, batch: int, num_tasks: int, seed: int) -> list[int]:
    """Task indices of a step: each epoch is a seeded permutation of all tasks."""
    out = []
    for k in range((step - 1) * batch, step * batch):
        epoch, pos = divmod(k, num_tasks)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(num_tasks)[pos]))
    return out


def _first_eval(run_dir: Path) -> dict[str, float]:
    """The held-out scores a run logged before its first step (what a resumed run reports as
    eval_before)."""
    for record in read_metrics(run_dir):
        if record["step"] == 0:
            return {k.removeprefix("eval/"): v for k, v in record.items() if k != "step"}
    return {}


def _initial_state(config: GRPOConfig, variables: dict) -> TrainState:
    # Copies: the update donates the state's buffers, and the caller keeps its variables.
    variables = jax.tree.map(jnp.copy, variables)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        opt_state=make_optimizer(config.optimizer).init(variables["params"]),
        router_bias=variables.get("router_bias", {}),
        rng=jax.random.key(config.seed),
        skipped=jnp.zeros((), jnp.int32),
    )


def train_grpo(
    run_dir: str | Path,
    *,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    variables: dict,
    reward: Weighted | Mapping[RewardFn, float],
    train_tasks: Sequence[Mapping[str, Any]],
    eval_tasks: Sequence[Mapping[str, Any]] = (),
    eval_fns: Mapping[str, RewardFn] | None = None,
    config: GRPOConfig = GRPOConfig(),
    meta: dict | None = None,
) -> GRPOResult:
    """GRPO from `variables` (the initial policy, also the first reference) to config.steps,
    resuming from run_dir/checkpoints when one is there. Tasks are dicts with a `prompt` and
    the columns the reward functions read. Before the first step and every `eval_every`
    steps, greedy completions of eval_tasks are scored by eval_fns and logged under eval/."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not train_tasks:
        raise ValueError("train_grpo: no training tasks")
    eval_fns = dict(eval_fns or {})
    state = _initial_state(config, variables)
    use_ref = config.loss.beta > 0
    ref_params = jax.tree.map(jnp.copy, state.params) if use_ref else None
    checkpointer = Checkpointer(
        run_dir / "checkpoints", every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    restored = checkpointer.restore_latest(
        state, None, extra_like={"ref": ref_params} if use_ref else None
    )
    if restored is not None:
        state, ref_params = restored.state, restored.extra["ref"] if use_ref else None
        log.info("resumed GRPO from step %d", int(state.step))
    longest = max(len(tokenizer.encode(t["prompt"])) for t in train_tasks)
    grpo_step = GRPOStep(
        cfg=cfg,
        tokenizer=tokenizer,
        reward=reward if isinstance(reward, Weighted) else Weighted(reward),
        loss=config.loss,
        optimizer=config.optimizer,
        sampling=config.sampling,
        group_size=config.group_size,
        mu=config.mu,
        max_new_tokens=config.max_new_tokens,
        row_len=row_length(longest, config.max_new_tokens),
        seed=config.seed,
    )
    meta = dict(meta or {}) | {"grpo": to_json(config)}

    def run_eval(step: int, writer) -> dict[str, float]:
        if not eval_tasks or not eval_fns:
            return {}
        means, _ = evaluate_policy(
            cfg, state.variables, tokenizer, eval_tasks, eval_fns,
            max_new_tokens=config.eval_max_new_tokens or config.max_new_tokens,
        )  # fmt: skip
        writer.write(step, means, prefix="eval/")
        return means

    def save(force=False):
        extra = {"ref": ref_params} if use_ref else None
        checkpointer.save(state, None, meta, force=force, extra=extra)

    start, stop, wall_start = int(state.step), StopFlag(), time.perf_counter()
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    eval_before: dict[str, float] = {}
    interrupted = False
    refresh = config.ref_refresh_every
    with MetricsWriter(run_dir) as writer, stop.installed():
        if start == 0:
            eval_before = last_eval = run_eval(0, writer)
        else:
            eval_before = _first_eval(run_dir)
        bar = tqdm(
            total=config.steps, initial=start, desc="grpo", unit="step", disable=not config.progress
        )
        try:
            for step in range(start + 1, config.steps + 1):
                if use_ref and refresh and step > 1 and (step - 1) % refresh == 0:
                    ref_params = jax.tree.map(jnp.copy, state.params)
                order = task_order(step, config.prompts_per_step, len(train_tasks), config.seed)
                state, last_train = grpo_step(
                    state, ref_params, step, [train_tasks[i] for i in order]
                )
                writer.write(step, last_train)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{last_train['reward_mean']:.3f}",
                    len=f"{last_train['completion_len_mean']:.0f}",
                    refresh=False,
                )
                if step % config.eval_every == 0 or step == config.steps:
                    last_eval = run_eval(step, writer)
                if checkpointer.due(step):
                    save()
                if stop.signal is not None:
                    log.warning("signal %d: saving step %d and stopping", stop.signal, step)
                    interrupted = True
                    break
            if start >= config.steps:  # resumed a finished run: report its scores again
                last_eval = run_eval(start, writer)
            save(force=True)
        finally:
            bar.close()
            checkpointer.close()
    if config.plots:
        from train.plots import make_plots

        make_plots(run_dir)
    return GRPOResult(
        step=int(state.step),
        interrupted=interrupted,
        train=last_train,
        eval=last_eval,
        eval_before=eval_before,
        wall_s=time.perf_counter() - wall_start,
    )
