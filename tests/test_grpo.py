"""The GRPO trainer: reward rises on a trivial task, exact resume, reference refresh, rollout
layout and log-probs."""

from __future__ import annotations

import dataclasses

import chex
import jax
import numpy as np
import pytest
from conftest import tiny_config

import model
from model.sampling import Sampling
from rl.grpo import GRPOConfig, task_order, train_grpo
from rl.grpo_loss import GRPOLossConfig
from rl.rollout import rollout, token_logprobs
from train.checkpoint import Checkpointer
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.state import init_state
from train.tokenizer import train_bpe

TEXT = "the cat sat on the mat. a dog ran to the log. xx yy zz " * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 300)


@pytest.fixture(scope="module")
def setup(tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, init_std=0.02)
    return cfg, model.init(cfg, jax.random.key(0))


def vowels(prompts, completions, **_):
    """The trivial task: the share of vowels among a completion's characters."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


TASKS = [{"prompt": p} for p in ("the cat", "a dog", "on the", "to the log", "sat", "mat.")]


def _config(steps, **changes):
    base = GRPOConfig(
        loss=GRPOLossConfig(beta=0.0),
        optimizer=OptimizerConfig(
            schedule=LRSchedule(peak_lr=1e-2, warmup_steps=0, min_lr=1e-2, final_lr=1e-2),
            weight_decay=0.0,
        ),
        steps=steps,
        prompts_per_step=3,
        group_size=6,
        max_new_tokens=6,
        eval_every=1000,
        checkpoint_every=1000,
        progress=False,
        plots=False,
    )
    return dataclasses.replace(base, **changes)


def _run(tmp_path, setup, tokenizer, config, name="run"):
    cfg, variables = setup
    return train_grpo(
        tmp_path / name,
        cfg=cfg,
        tokenizer=tokenizer,
        variables=variables,
        reward={vowels: 1.0},
        train_tasks=TASKS,
        eval_tasks=TASKS,
        eval_fns={"vowels": vowels},
        config=config,
    )


def _metrics(run_dir):
    from train.metrics import read_metrics

    return read_metrics(run_dir)


def test_reward_rises_on_a_trivial_task(tmp_path, setup, tokenizer):
    result = _run(tmp_path, setup, tokenizer, _config(30, plots=True))
    rewards = [r["reward_mean"] for r in _metrics(tmp_path / "run") if "reward_mean" in r]
    assert len(rewards) == 30
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.12, (first, last)
    # Greedy held-out decoding moves less than the sampled reward in 30 steps: with jax 0.10.2
    # and flax 0.12.8 it goes 0.225 -> 0.25 (the same on the commit before issue 13) while the
    # sampled train reward goes 0.09 -> 0.27, so the held-out bar is a strict rise.
    assert result.eval["vowels"] > result.eval_before["vowels"]
    record = _metrics(tmp_path / "run")[-2]
    for key in ("reward_std", "zero_std_groups", "completion_len_mean", "completion_len_max",
                "truncated", "clip_low", "clip_high", "entropy", "rollout_tokens_per_s",
                "train_tokens_per_s", "reward/vowels", "grad_norm", "rollout_s",
                "reward_s"):  # fmt: skip
        assert key in record, key
    assert record["sampler_logp_gap"] < 1e-4  # the training forward reproduces the sampler
    plots = {p.name for p in (tmp_path / "run" / "plots").iterdir()}
    assert {"rewards.png", "eval_scores.png", "completion_length.png"} <= plots


def _saved(run_dir, setup):
    cfg, _ = setup
    checkpointer = Checkpointer(run_dir / "checkpoints", every=1, keep=10)
    like = init_state(cfg, make_optimizer(OptimizerConfig()), jax.random.key(0))
    restored = checkpointer.restore_latest(like, None, extra_like={"ref": like.params})
    checkpointer.close()
    return restored


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_resume_is_exact_and_the_reference_refreshes(tmp_path, setup, tokenizer):
    _, variables = setup
    config = _config(4, mu=2, loss=GRPOLossConfig(beta=0.04), ref_refresh_every=2)
    straight = _run(tmp_path, setup, tokenizer, config, "straight")
    _run(tmp_path, setup, tokenizer, dataclasses.replace(config, steps=2), "resumed")
    at_two = _saved(tmp_path / "resumed", setup)
    resumed = _run(tmp_path, setup, tokenizer, config, "resumed")
    assert straight.step == resumed.step == 4
    a = [r for r in _metrics(tmp_path / "straight") if "reward_mean" in r]
    b = [r for r in _metrics(tmp_path / "resumed") if "reward_mean" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward_mean", "loss", "kl", "completion_len_mean"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert a[-1]["kl"] > 0  # beta > 0: the KL to the reference is measured
    # Until step 2 the reference is the initial policy; step 3 starts by refreshing it.
    chex.assert_trees_all_equal(at_two.extra["ref"], variables["params"])
    at_four = _saved(tmp_path / "straight", setup)
    chex.assert_trees_all_equal(at_four.extra["ref"], at_two.state.params)
    assert not _equal(at_four.state.params, at_two.state.params)
    # MTP is not part of the RL policy: left exactly as it was.
    chex.assert_trees_all_equal(at_four.state.params["mtp"], variables["params"]["mtp"])


def test_rollout_rows_and_logprobs(setup, tokenizer):
    cfg, variables = setup
    prompts = [tokenizer.encode("the cat"), tokenizer.encode("a dog ran to the")]
    ro = rollout(
        cfg, variables, prompts, group_size=3, sampling=Sampling(temperature=1.0),
        max_new_tokens=5, stop_tokens=[tokenizer.eos_id], rng=jax.random.key(1), row_len=32,
    )  # fmt: skip
    assert ro.tokens.shape == (6, 32) and ro.mask.shape == (6, 31)
    for i, completion in enumerate(ro.completions):
        prompt = prompts[i // 3]
        P, C = len(prompt), len(completion)
        assert ro.tokens[i, :P].tolist() == prompt
        assert ro.tokens[i, P : P + C].tolist() == completion
        assert ro.mask[i].sum() == C and ro.mask[i, P - 1 : P - 1 + C].all()
        assert ro.truncated[i] == (C == 5 and completion[-1] != tokenizer.eos_id)
    logp, entropy = token_logprobs(cfg, variables, jax.numpy.asarray(ro.tokens), 1.0)
    np.testing.assert_allclose(np.asarray(logp) * ro.mask, ro.sampler_logp, atol=2e-5)
    assert (np.asarray(entropy) > 0).all()


def test_task_order_covers_every_task_each_epoch():
    seen = [i for step in range(1, 5) for i in task_order(step, 3, 6, seed=0)]
    assert sorted(seen[:6]) == sorted(seen[6:12]) == list(range(6))
    assert seen[:6] != list(range(6)) and seen[:6] != seen[6:12]  # shuffled, anew each epoch
    # The order is one stream over all steps: a batch of 4 (whose second step straddles the
    # epoch boundary) reads the same tasks in the same order as batches of 3.
    assert [i for step in (1, 2, 3) for i in task_order(step, 4, 6, seed=0)] == seen[:12]
    assert seen[:6] != [i for step in (1, 2) for i in task_order(step, 3, 6, seed=1)]


def test_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="temperature"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="mu"):
        GRPOConfig(mu=0)
    with pytest.raises(ValueError, match="beta"):
        GRPOLossConfig(beta=-1.0)
