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

The run goes through the one training loop (train/loop.py: run-dir guard, resume,
checkpoint cadence, metrics, stop signals, progress, plots) with a rollout + update step over
the task order. It runs on a mesh like pre-training (`config.parallel`): the policy, its
optimizer state and the reference are created and kept in their shardings, rollouts and
updates run under the mesh's rules, and a rollout batch is split over the batch axes when
its row count allows. A rerun into a run dir whose config.json differs in the model, the
tokenizer, the rewards, the training tasks or a GRPO field outside SAFE_FIELDS is refused.

Router biases stay as the base left them (no load balancing in RL) and the MTP modules are
not trained. Multi-process (multi-host) GRPO is not supported yet: every process would run
the same rollouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig
from model.sampling import Sampling
from rl.evaluate import check_tasks, loop_evaluator, prompt_ids
from rl.grpo_loss import GRPOLossConfig
from rl.grpo_step import GRPOStep
from rl.rewards import RewardFn, Weighted
from rl.rollout import row_length
from sharding.mesh import Parallel, ParallelConfig, make_parallel
from train.loop import LoopConfig, TrainLoop
from train.metrics import read_metrics
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.run_dir import digest, to_json
from train.sharded_state import state_shardings
from train.state import TrainState
from train.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Fields of a GRPO run dir's config that may change on resume: cadence, length, display,
# the mesh, and what the held-out evaluation looks at.
SAFE_FIELDS = (
    "grpo.steps",
    "grpo.eval_every",
    "grpo.eval_max_new_tokens",
    "grpo.checkpoint_every",
    "grpo.keep_checkpoints",
    "grpo.progress",
    "grpo.plots",
    "grpo.parallel",
    "model.moe.ep_exchange",  # every exchange gives the same values
    "model.logical_rules",  # a layout, set from grpo.parallel
    "grpo.allow_config_change",
    "eval_tasks",
    "eval_fns",
)
OVERRIDE = "GRPOConfig.allow_config_change=True (r1-zero: --set grpo.allow_config_change=true)"


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
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    allow_config_change: bool = False  # resume a run dir whose config differs (run_dir.py)

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
        if not isinstance(self.parallel, ParallelConfig):
            raise ValueError(f"GRPOConfig.parallel must be a ParallelConfig, got {self.parallel!r}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    @property
    def loop(self) -> LoopConfig:
        """The loop's part of this config."""
        return LoopConfig(
            steps=self.steps,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            keep_checkpoints=self.keep_checkpoints,
            peak_flops=None,
            progress=self.progress,
            plots=self.plots,
            allow_config_change=self.allow_config_change,
        )


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


def initial_policy_state(
    config: GRPOConfig, variables: dict, optimizer, shardings: TrainState
) -> TrainState:
    """The initial policy's train state, created in its shardings (`config.seed` seeds its
    key; GRPO and on-policy distillation)."""
    # Copies: the update donates the state's buffers, and the caller keeps its variables.
    where = {"params": shardings.params, "router_bias": shardings.router_bias}
    variables = jax.device_put(
        jax.tree.map(jnp.copy, dict(variables)), {k: where[k] for k in variables}
    )

    def build(variables):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            opt_state=optimizer.init(variables["params"]),
            router_bias=variables.get("router_bias", {}),
            rng=jax.random.key(config.seed),
            skipped=jnp.zeros((), jnp.int32),
        )

    return jax.jit(build, out_shardings=shardings)(variables)


def _names(fns: Mapping) -> dict[str, Any]:
    # Weighted.weights is {name: weight}; a plain mapping is {function: weight}.
    return {k if isinstance(k, str) else getattr(k, "__name__", repr(k)): w for k, w in fns.items()}


def run_config(
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    reward: Weighted,
    train_tasks: Sequence[Mapping[str, Any]],
    eval_tasks: Sequence[Mapping[str, Any]],
    eval_fns: Mapping[str, RewardFn],
    config: GRPOConfig,
) -> dict[str, Any]:
    """What a GRPO run dir's config.json holds: everything that decides the trained state
    (model, tokenizer, rewards, training tasks, GRPO settings) and the evaluation's inputs."""
    weights = getattr(reward, "weights", None)
    return {
        "model": to_json(cfg),
        "grpo": to_json(config),
        "tokenizer": {
            "vocab_size": tokenizer.vocab_size,
            "sha256": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:16],
        },
        "reward": _names(weights) if isinstance(weights, Mapping) else repr(reward),
        "train_tasks": {"count": len(train_tasks), "sha256": digest(list(train_tasks))},
        "eval_tasks": {"count": len(eval_tasks), "sha256": digest(list(eval_tasks))},
        "eval_fns": sorted(eval_fns),
    }


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
    parallel: Parallel | None = None,
) -> GRPOResult:
    """GRPO from `variables` (the initial policy, also the first reference) to config.steps,
    resuming from run_dir/checkpoints when one is there. Tasks are dicts with a `prompt` and
    the columns the reward functions read. Before the first step and every `eval_every`
    steps, greedy completions of eval_tasks are scored by eval_fns and logged under eval/.
    `parallel` (default: make_parallel(config.parallel)) is the mesh the run uses."""
    if not train_tasks:
        raise ValueError("train_grpo: no training tasks")
    check_tasks(train_tasks, "train_tasks")
    if eval_tasks:
        check_tasks(eval_tasks, "eval_tasks")
    eval_fns = dict(eval_fns or {})
    reward = reward if isinstance(reward, Weighted) else Weighted(reward)
    loop = TrainLoop(
        run_dir,
        config.loop,
        config=run_config(cfg, tokenizer, reward, train_tasks, eval_tasks, eval_fns, config),
        safe=SAFE_FIELDS,
        override=OVERRIDE,
        meta=dict(meta or {}) | {"grpo": to_json(config)},
        desc="grpo",
    )
    parallel = parallel or make_parallel(config.parallel)
    cfg = parallel.configure(cfg)  # the run config keeps the caller's
    optimizer = make_optimizer(config.optimizer)
    shardings = state_shardings(cfg, optimizer, parallel)
    with parallel.activate():
        state = initial_policy_state(config, variables, optimizer, shardings)
    use_ref = config.loss.beta > 0
    ref = {"ref": jax.tree.map(jnp.copy, state.params)} if use_ref else None
    state, ref, _ = loop.resume(state, extra=ref)
    longest = max(len(prompt_ids(t, tokenizer)) for t in train_tasks)
    grpo_step = GRPOStep(
        cfg=cfg,
        tokenizer=tokenizer,
        reward=reward,
        loss=config.loss,
        optimizer=config.optimizer,
        sampling=config.sampling,
        group_size=config.group_size,
        mu=config.mu,
        max_new_tokens=config.max_new_tokens,
        row_len=row_length(longest, config.max_new_tokens),
        seed=config.seed,
        parallel=parallel,
    )
    refresh = config.ref_refresh_every

    def step_fn(state: TrainState, step: int) -> tuple[TrainState, dict]:
        nonlocal ref
        if use_ref and refresh and step > 1 and (step - 1) % refresh == 0:
            ref = {"ref": jax.tree.map(jnp.copy, state.params)}
        order = task_order(step, config.prompts_per_step, len(train_tasks), config.seed)
        tasks = [train_tasks[i] for i in order]
        return grpo_step(state, ref["ref"] if use_ref else None, step, tasks)

    run_eval = loop_evaluator(
        cfg, tokenizer, eval_tasks, eval_fns, config.eval_max_new_tokens or config.max_new_tokens
    )

    def postfix(record: dict) -> dict:
        return {
            "reward": f"{float(record['reward_mean']):.3f}",
            "len": f"{float(record['completion_len_mean']):.0f}",
        }

    result = loop.run(
        state,
        step_fn,
        extra=(lambda: ref) if use_ref else None,
        evaluate=run_eval,
        evaluate_first=True,
        check=lambda step, host: {k: v.item() if np.ndim(v) == 0 else v for k, v in host.items()},
        postfix=postfix,
        parallel=parallel,
    )
    return GRPOResult(
        step=result.step,
        interrupted=result.interrupted,
        train=result.train,
        eval=result.eval,
        eval_before=_first_eval(Path(run_dir)),
        wall_s=result.wall_s,
    )
