"""On-policy distillation (GKD's on-policy mode): the student samples, the teacher scores every
sampled position, and the student minimises the per-token divergence to the teacher on its own
samples, by default the reverse KL(student || teacher) over the whole vocabulary.

    result = distill_on_policy(run_dir, student_cfg=cfg, student=variables, teacher_cfg=t_cfg,
                               teacher=t_vars, tokenizer=tok, train_tasks=tasks,
                               eval_tasks=heldout, eval_fns={"accuracy": integer_accuracy},
                               config=OnPolicyConfig(steps=100))

A share `1 - on_policy_fraction` of the steps (drawn per step from the seed) trains on fixed
completions instead, the tasks' `completion` column (teacher samples or reference answers),
which is GKD's mixture of on-policy and supervised data; at 1 every step is on-policy. The
divergence of train/distill_loss.py (`beta`: 0 forward KL, 1 reverse KL, between: generalised
JSD), summed over the completion tokens and divided by their number in the batch. The teacher
runs jitted without gradients; it may be any jaxseek model with the student's tokenizer (a V3
MoE teaching a dense student, or the reverse). Runs go through the one training loop
(checkpoints, exact resume: sampling keys and task order follow from the step, metrics, plots).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig, forward
from model.sampling import Sampling
from rl.evaluate import check_tasks, loop_evaluator, prompt_ids
from rl.grpo import GRPOResult, constant_lr, initial_policy_state, task_order
from rl.rewards import RewardFn
from rl.rollout import Rollout, rollout, row_length
from sharding.mesh import Parallel, ParallelConfig, make_parallel
from train.data import TOKENIZER_FILE
from train.distill_loss import check_beta, token_divergence
from train.loop import LoopConfig, TrainLoop
from train.metrics import read_metrics
from train.optimizer import OptimizerConfig, make_optimizer
from train.run_dir import digest, to_json
from train.sharded_state import state_shardings
from train.state import TrainState
from train.step import apply_update
from train.tokenizer import Tokenizer

SAFE_FIELDS = (
    "distill.steps",
    "distill.eval_every",
    "distill.eval_max_new_tokens",
    "distill.checkpoint_every",
    "distill.progress",
    "distill.plots",
    "distill.parallel",
    "model.logical_rules",
    "distill.allow_config_change",
    "eval_tasks",
    "eval_fns",
)
OVERRIDE = "OnPolicyConfig.allow_config_change=True"


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: constant_lr(1e-4))
    steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0  # of the student's sampling
    beta: float = 1.0  # 1 reverse KL (on-policy distillation's), 0 forward KL, between: JSD
    kd_temperature: float = 1.0  # softens both distributions in the divergence
    on_policy_fraction: float = 1.0  # of the steps; the rest train on the tasks' completions
    eval_every: int = 20
    eval_max_new_tokens: int | None = None
    checkpoint_every: int = 50
    seed: int = 0
    progress: bool = True
    plots: bool = True
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    allow_config_change: bool = False

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                     "eval_every", "checkpoint_every"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"OnPolicyConfig.{name} must be an int > 0, got {value!r}")
        for name in ("temperature", "kd_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OnPolicyConfig.{name} must be > 0, got {getattr(self, name)!r}")
        check_beta(self.beta)
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(
                f"OnPolicyConfig.on_policy_fraction must be in [0, 1], got "
                f"{self.on_policy_fraction!r}"
            )

    @property
    def loop(self) -> LoopConfig:
        return LoopConfig(
            steps=self.steps, eval_every=self.eval_every, checkpoint_every=self.checkpoint_every,
            peak_flops=None, progress=self.progress, plots=self.plots,
            allow_config_change=self.allow_config_change,
        )  # fmt: skip


def on_policy_at(step: int, config: OnPolicyConfig) -> bool:
    """Whether `step` trains on the student's samples (seeded per step: a resume agrees)."""
    if config.on_policy_fraction >= 1:
        return True
    draw = np.random.default_rng([config.seed, step, 7]).random()
    return bool(draw < config.on_policy_fraction)


def fixed_rows(prompts: Sequence[list[int]], completions: Sequence[list[int]], row_len: int):
    """[prompt | completion | 0s] rows and the mask of completion targets, as a rollout's."""
    tokens = np.zeros((len(prompts), row_len), np.int32)
    mask = np.zeros((len(prompts), row_len - 1), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        c = c[: row_len - len(p)]
        tokens[i, : len(p)], tokens[i, len(p) : len(p) + len(c)] = p, c
        mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
    return tokens, mask


@functools.lru_cache(maxsize=4)
def _teacher_logits(cfg: ModelConfig):
    fn = lambda variables, tokens: forward(cfg.replace(mtp_depth=0), variables, tokens).logits
    return jax.jit(lambda variables, tokens: jax.lax.stop_gradient(fn(variables, tokens)))


def _update_step(cfg: ModelConfig, config: OnPolicyConfig):
    optimizer = make_optimizer(config.optimizer)
    student = cfg.replace(mtp_depth=0)

    def loss_fn(params, router_bias, batch):
        logits = forward(student, {"params": params, "router_bias": router_bias},
                         batch["tokens"][:, :-1]).logits  # fmt: skip
        div = token_divergence(logits, batch["teacher_logits"], config.beta, config.kd_temperature)
        mask = batch["mask"]
        return (div * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def step(state: TrainState, batch: dict):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.router_bias, batch)
        new, metrics = apply_update(state, loss, grads, optimizer, config.optimizer.schedule)
        return new, metrics | {"loss": loss, "kd": loss}

    return jax.jit(step, donate_argnums=0)


def distill_on_policy(
    run_dir: str | Path,
    *,
    student_cfg: ModelConfig,
    student: dict,
    teacher_cfg: ModelConfig,
    teacher: dict,
    tokenizer: Tokenizer,
    train_tasks: Sequence[Mapping[str, Any]],
    eval_tasks: Sequence[Mapping[str, Any]] = (),
    eval_fns: Mapping[str, RewardFn] | None = None,
    config: OnPolicyConfig = OnPolicyConfig(),
    meta: dict | None = None,
    parallel: Parallel | None = None,
) -> GRPOResult:
    """Distil `teacher` into `student` on the student's own samples of train_tasks' prompts
    (and on their `completion` texts for the off-policy share), resuming from run_dir."""
    if not train_tasks:
        raise ValueError("distill_on_policy: no training tasks")
    check_tasks(train_tasks, "train_tasks")
    if config.on_policy_fraction < 1 and not all("completion" in t for t in train_tasks):
        raise ValueError(
            "OnPolicyConfig.on_policy_fraction < 1 trains some steps on fixed completions: "
            "every training task needs a 'completion' column"
        )
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ValueError(
            f"distill_on_policy: the teacher has {teacher_cfg.vocab_size} logits, the student "
            f"{student_cfg.vocab_size}; on-policy distillation compares them id by id"
        )
    eval_fns = dict(eval_fns or {})
    run_config = {
        "model": to_json(student_cfg), "teacher": to_json(teacher_cfg), "distill": to_json(config),
        "train_tasks": {"count": len(train_tasks), "sha256": digest(list(train_tasks))},
        "eval_tasks": {"count": len(eval_tasks), "sha256": digest(list(eval_tasks))},
        "eval_fns": sorted(eval_fns),
    }  # fmt: skip
    loop = TrainLoop(run_dir, config.loop, config=run_config, safe=SAFE_FIELDS,
                     override=OVERRIDE, meta=dict(meta or {}), desc="on-policy")  # fmt: skip
    parallel = parallel or make_parallel(config.parallel)
    cfg = parallel.configure(student_cfg)
    optimizer = make_optimizer(config.optimizer)
    shardings = state_shardings(cfg, optimizer, parallel)
    with parallel.activate():
        state = initial_policy_state(config, student, optimizer, shardings)
    state, _, _ = loop.resume(state)
    # The student's run dir is a complete run (train.run.load_run, `generate --ckpt`).
    if not (Path(run_dir) / TOKENIZER_FILE).exists():
        tokenizer.save(Path(run_dir) / TOKENIZER_FILE)
    prompts = [prompt_ids(t, tokenizer) for t in train_tasks]
    completions = [[*tokenizer.encode(t["completion"]), tokenizer.eos_id] if "completion" in t
                   else None for t in train_tasks]  # fmt: skip
    longest = max(len(p) for p in prompts)
    row_len = row_length(longest, config.max_new_tokens)
    sampling = Sampling(temperature=config.temperature)
    update = _update_step(cfg, config)
    teacher_logits = _teacher_logits(teacher_cfg)

    def step_fn(state: TrainState, step: int) -> tuple[TrainState, dict]:
        order = task_order(step, config.prompts_per_step, len(train_tasks), config.seed)
        batch_prompts = [prompts[i] for i in order]
        on_policy = on_policy_at(step, config)
        with parallel.activate():
            if on_policy:
                ro: Rollout = rollout(
                    cfg, state.variables, batch_prompts, group_size=config.samples_per_prompt,
                    sampling=sampling, max_new_tokens=config.max_new_tokens,
                    stop_tokens=[tokenizer.eos_id], row_len=row_len,
                    rng=jax.random.fold_in(jax.random.key(config.seed), step),
                )  # fmt: skip
                tokens, mask = ro.tokens, ro.mask
                lengths = ro.completion_lengths
            else:
                tokens, mask = fixed_rows(batch_prompts, [completions[i] for i in order], row_len)
                lengths = mask.sum(-1)
            t_logits = teacher_logits(teacher, jnp.asarray(tokens[:, :-1]))
            batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
                     "teacher_logits": t_logits}  # fmt: skip
            state, metrics = update(state, batch)
        # How likely the teacher finds the trained tokens (its log-prob per completion token).
        t_logp = jax.nn.log_softmax(t_logits, -1)
        picked = jnp.take_along_axis(t_logp, jnp.asarray(tokens[:, 1:, None]), -1)[..., 0]
        metrics |= {
            "on_policy": float(on_policy),
            "tokens": float(tokens[:, :-1].size),  # per row: sampled (when on-policy), scored
            "completion_len_mean": float(np.mean(lengths)),
            "teacher_logp_mean": float((picked * mask).sum() / max(mask.sum(), 1.0)),
        }
        return state, metrics

    run_eval = loop_evaluator(
        cfg, tokenizer, eval_tasks, eval_fns, config.eval_max_new_tokens or config.max_new_tokens
    )

    result = loop.run(
        state, step_fn, evaluate=run_eval, evaluate_first=True,
        check=lambda step, host: {k: v.item() if np.ndim(v) == 0 else v for k, v in host.items()},
        postfix=lambda r: {"kd": f"{float(r['kd']):.3f}"}, parallel=parallel,
    )  # fmt: skip
    first = next((r for r in read_metrics(Path(run_dir)) if r["step"] == 0), {})
    return GRPOResult(
        step=result.step, interrupted=result.interrupted, train=result.train, eval=result.eval,
        eval_before={k.removeprefix("eval/"): v for k, v in first.items() if k != "step"},
        wall_s=result.wall_s,
    )  # fmt: skip
