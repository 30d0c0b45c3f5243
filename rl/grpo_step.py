"""One GRPO step: rollout, rewards, group advantages, mu policy updates, the step's metrics.

The update is a pure jitted function of (TrainState, batch); `GRPOStep` wires it to the
rollout and the rewards for a run. The log-probs the loss trains on come from the training
forward pass; with mu = 1 the rollout policy is the current one, so its log-probs are that
same forward pass with the gradient stopped (as TRL does), and with mu > 1 they are computed
once before the first update. On a mesh (`parallel`), the update keeps the state in its
shardings and the rollout batch is split over the batch axes when its row count allows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import ModelConfig
from model.sampling import Sampling
from rl.evaluate import decode_completions, prompt_ids, task_columns
from rl.grpo_loss import GRPOLossConfig, group_advantages, grpo_loss
from rl.rewards import Weighted
from rl.rollout import Rollout, rollout, token_logprobs
from sharding.mesh import Parallel
from train.optimizer import OptimizerConfig, make_optimizer, update_count
from train.sharded_state import state_shardings
from train.state import TrainState
from train.tokenizer import Tokenizer


def grpo_objective(
    cfg: ModelConfig, loss_cfg: GRPOLossConfig, temperature: float, *, on_policy: bool
) -> Callable[[dict, dict, dict], tuple[jax.Array, dict]]:
    """(params, router_bias, batch) -> (GRPO loss, metrics) on a rollout batch {tokens, mask,
    advantages, sampler_logp, [old_logp], [ref_logp]}. on_policy: the batch was sampled from
    these very parameters (mu = 1), so the old log-probs are this forward pass's, gradient
    stopped."""

    def loss_fn(params, router_bias, batch):
        variables = {"params": params, "router_bias": router_bias}
        logp, entropy = token_logprobs(cfg, variables, batch["tokens"], temperature)
        old = jax.lax.stop_gradient(logp) if on_policy else batch["old_logp"]
        loss, metrics = grpo_loss(
            logp, old, batch.get("ref_logp"), batch["advantages"], batch["mask"], loss_cfg
        )
        mask = batch["mask"]
        tokens = jnp.maximum(mask.sum(), 1.0)
        gap = jnp.abs(jax.lax.stop_gradient(logp) - batch["sampler_logp"])
        metrics |= {
            "entropy": jnp.sum(jax.lax.stop_gradient(entropy) * mask) / tokens,
            "sampler_logp_gap": jnp.max(gap * mask),
        }
        return loss, metrics

    return loss_fn


def make_update_step(
    cfg: ModelConfig,
    loss_cfg: GRPOLossConfig,
    optimizer: optax.GradientTransformation,
    temperature: float,
    *,
    on_policy: bool,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One policy update on a rollout batch (see `grpo_objective`). A non-finite loss or
    gradient drops the update and counts it in state.skipped. The MTP modules are not part
    of the RL policy and stay exactly as they are."""
    objective = grpo_objective(cfg, loss_cfg, temperature, on_policy=on_policy)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.router_bias, batch
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if "mtp" in params:
            params = {**params, "mtp": state.params["mtp"]}
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        state = state.replace(
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        return state, metrics | {"loss": loss, "grad_norm": grad_norm}

    return step


@functools.lru_cache(maxsize=8)
def jitted_update(
    cfg,
    loss_cfg,
    opt_cfg: OptimizerConfig,
    temperature: float,
    on_policy: bool,
    parallel: Parallel | None = None,
):
    """make_update_step jitted with the state donated (and, with `parallel`, kept in its
    shardings); one compilation per configuration, shared by the runs of a process."""
    optimizer = make_optimizer(opt_cfg)
    step = make_update_step(cfg, loss_cfg, optimizer, temperature, on_policy=on_policy)
    if parallel is None:
        return jax.jit(step, donate_argnums=0)
    shardings = state_shardings(cfg, optimizer, parallel)
    return jax.jit(step, out_shardings=(shardings, parallel.replicated()), donate_argnums=0)


def place_batch(batch: dict, parallel: Parallel | None) -> dict:
    """A rollout batch's arrays split over the mesh's batch axes (replicated when the row
    count does not divide; on one device as they are)."""
    if parallel is None:
        return batch
    rows = len(batch["tokens"])
    if rows % parallel.batch_size_multiple:
        return jax.device_put(batch, parallel.replicated())
    return jax.device_put(batch, parallel.batch_sharding())


@functools.lru_cache(maxsize=8)
def jitted_logprobs(cfg: ModelConfig, temperature: float):
    return jax.jit(functools.partial(token_logprobs, cfg, temperature=temperature))


def reward_stats(ro: Rollout, rewards: np.ndarray, per_fn: dict, group_size: int) -> dict:
    """Rollout metrics: reward mean/std (NaN = unscored, left out), each function's mean, the
    fraction of groups whose rewards are all equal (no learning signal), completion lengths
    and the fraction cut at max_new_tokens."""
    groups = rewards.reshape(-1, group_size)
    with warnings.catch_warnings():  # an all-NaN group is fine: it has no spread
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanmax(groups, axis=1) - np.nanmin(groups, axis=1)
    lengths = ro.completion_lengths
    stats = {
        "reward_mean": float(np.nanmean(rewards)),
        "reward_std": float(np.nanstd(rewards)),
        "zero_std_groups": float(np.mean(~(spread > 0))),
        "completion_len_mean": float(lengths.mean()),
        "completion_len_max": int(lengths.max()),
        "truncated": float(ro.truncated.mean()),
    }
    for name, values in per_fn.items():
        scored = [v for v in values if v is not None]
        if scored:
            stats[f"reward/{name}"] = float(np.mean(scored))
    return stats


@dataclasses.dataclass(frozen=True)
class GRPOStep:
    """Everything a step needs besides the state: call it with (state, ref_params, step,
    tasks) to get (new state, metrics record). The step number seeds the sampling."""

    cfg: ModelConfig
    tokenizer: Tokenizer
    reward: Weighted
    loss: GRPOLossConfig
    optimizer: OptimizerConfig
    sampling: Sampling
    group_size: int
    mu: int
    max_new_tokens: int
    row_len: int
    seed: int
    parallel: Parallel | None = None  # the mesh the state lives on; None: one device

    def __call__(
        self,
        state: TrainState,
        ref_params: dict | None,
        step: int,
        tasks: Sequence[Mapping[str, Any]],
    ) -> tuple[TrainState, dict]:
        G, T = self.group_size, self.sampling.temperature
        start = time.perf_counter()
        ro = rollout(
            self.cfg, state.variables, [prompt_ids(t, self.tokenizer) for t in tasks],
            group_size=G, sampling=self.sampling, max_new_tokens=self.max_new_tokens,
            stop_tokens=[self.tokenizer.eos_id], row_len=self.row_len,
            rng=jax.random.fold_in(jax.random.key(self.seed), step),
        )  # fmt: skip
        rollout_s = time.perf_counter() - start
        texts = decode_completions(self.tokenizer, ro.completions)
        prompts = [t["prompt"] for t in tasks for _ in range(G)]
        start = time.perf_counter()
        totals, per_fn = self.reward(prompts, texts, **task_columns(tasks, G))
        reward_s = time.perf_counter() - start
        rewards = np.array([np.nan if r is None else r for r in totals], np.float32)
        batch = {
            "tokens": ro.tokens,
            "mask": ro.mask * np.isfinite(rewards)[:, None],
            "advantages": np.asarray(group_advantages(jnp.asarray(rewards), G, self.loss.adv_eps)),
            "sampler_logp": ro.sampler_logp,
        }
        batch = place_batch(batch, self.parallel)
        start = time.perf_counter()
        logprobs = jitted_logprobs(self.cfg, T)
        if self.mu > 1:
            batch["old_logp"] = logprobs(state.variables, batch["tokens"])[0]
        if ref_params is not None:
            ref = {"params": ref_params, "router_bias": state.router_bias}
            batch["ref_logp"] = logprobs(ref, batch["tokens"])[0]
        update = jitted_update(self.cfg, self.loss, self.optimizer, T, self.mu == 1, self.parallel)
        # The LR the first update applies: the optimizer's own count, which a dropped
        # (non-finite) update does not advance, unlike the step number.
        applied = update_count(state.opt_state)
        applied = (step - 1) * self.mu if applied is None else int(applied)
        updates = []
        for _ in range(self.mu):
            state, metrics = update(state, batch)
            updates.append(metrics)
        state = state.replace(step=state.step + 1)
        updates = jax.device_get(updates)
        train_s = time.perf_counter() - start
        record = reward_stats(ro, rewards, per_fn, G)
        record |= {k: float(np.mean([u[k] for u in updates])) for k in updates[0]}
        record |= {
            # Before the first update the policy is the sampler: their log-probs must agree.
            "sampler_logp_gap": float(updates[0]["sampler_logp_gap"]),
            "learning_rate": float(self.optimizer.schedule(applied)),
            "rollout_tokens_per_s": float(ro.completion_lengths.sum() / rollout_s),
            # Seconds of this step's rollouts and of scoring them (reward models included).
            "rollout_s": rollout_s,
            "reward_s": reward_s,
            "train_tokens_per_s": float(ro.tokens.size * self.mu / train_s),
            "skipped": int(state.skipped),
        }
        return state, record
