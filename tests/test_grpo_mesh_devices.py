"""GRPO on a mesh computes what one device computes (run on 8 forced host devices by
tests/test_grpo_mesh.py; skipped in a process with fewer devices)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import model
from model.sampling import Sampling
from rl.grpo import GRPOConfig, initial_policy_state, train_grpo
from rl.grpo_loss import GRPOLossConfig, group_advantages
from rl.grpo_step import grpo_objective, jitted_update, place_batch
from rl.rollout import rollout
from sharding.mesh import ParallelConfig, make_parallel
from sharding.rules import Rules
from tests.conftest import tiny_config
from train.metrics import read_metrics
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.sharded_state import state_shardings
from train.tokenizer import train_bpe

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: run through tests/test_grpo_mesh.py"
)

TEXT = "the cat sat on the mat. a dog ran to the log. xx yy zz " * 20
TASKS = [{"prompt": p} for p in ("the cat", "a dog", "on the", "to the log")]
LOSS = GRPOLossConfig(beta=0.04)
OPT = OptimizerConfig(
    schedule=LRSchedule(peak_lr=1e-2, warmup_steps=0, min_lr=1e-2, final_lr=1e-2),
    weight_decay=0.0,
)
MESHES = {
    "fsdp": ParallelConfig(),
    "data": ParallelConfig(data=8, rules=Rules.DATA),
    "fsdp_tp": ParallelConfig(fsdp=4, tensor=2, rules=Rules.FSDP_EP_TP),
}


@pytest.fixture(scope="module")
def setup():
    tokenizer = train_bpe([TEXT], 300)
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, init_std=0.02)
    return cfg, tokenizer, model.init(cfg, jax.random.key(0))


def _single():
    return make_parallel(ParallelConfig(fsdp=1), devices=jax.devices()[:1])


def _batch(cfg, tokenizer, variables) -> dict:
    """A rollout batch of 4 prompts x 4 samples (numpy), with reference log-probs."""
    ro = rollout(
        cfg, variables, [tokenizer.encode(t["prompt"]) for t in TASKS], group_size=4,
        sampling=Sampling(temperature=1.0), max_new_tokens=6, stop_tokens=[tokenizer.eos_id],
        rng=jax.random.key(1), row_len=32,
    )  # fmt: skip
    rewards = np.random.default_rng(0).random(len(ro.tokens)).astype(np.float32)
    return {
        "tokens": ro.tokens,
        "mask": ro.mask,
        "advantages": np.asarray(group_advantages(rewards, 4, 1e-4)),
        "sampler_logp": ro.sampler_logp,
        "ref_logp": ro.sampler_logp - 0.01,
    }


def _loss_and_grads(cfg, variables, batch, parallel):
    cfg = parallel.configure(cfg)
    optimizer = make_optimizer(OPT)
    shardings = state_shardings(cfg, optimizer, parallel)
    with parallel.activate():
        state = initial_policy_state(GRPOConfig(), variables, optimizer, shardings)
        objective = grpo_objective(cfg, LOSS, 1.0, on_policy=True)
        fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
        (loss, metrics), grads = fn(state.params, state.router_bias, place_batch(batch, parallel))
        update = jitted_update(cfg, LOSS, OPT, 1.0, True, parallel)
        state, _ = update(state, place_batch(batch, parallel))
    return jax.device_get((loss, metrics, grads)), state


@pytest.fixture(scope="module")
def one_device(setup):
    """(the rollout batch, one device's loss, metrics and gradients on it): shared by meshes."""
    cfg, tokenizer, variables = setup
    batch = _batch(cfg, tokenizer, variables)
    return batch, _loss_and_grads(cfg, variables, batch, _single())[0]


@pytest.mark.parametrize("mesh", MESHES)
def test_update_step_matches_one_device(setup, one_device, mesh):
    cfg, _, variables = setup
    batch, (loss1, metrics1, grads1) = one_device
    parallel = make_parallel(MESHES[mesh])
    (loss8, metrics8, grads8), state = _loss_and_grads(cfg, variables, batch, parallel)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-6)
    for key in ("kl", "entropy", "clip_low", "clip_high"):
        np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5, atol=1e-6)
    for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5)
    # The updated state stays in its shardings on the mesh.
    wanted = state_shardings(cfg, make_optimizer(OPT), parallel)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(wanted), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_train_grpo_on_a_mesh_matches_one_device(setup, tmp_path):
    cfg, tokenizer, variables = setup
    config = GRPOConfig(
        loss=LOSS, optimizer=OPT, steps=2, prompts_per_step=4, group_size=4, max_new_tokens=6,
        eval_every=2, checkpoint_every=2, progress=False, plots=False,
    )  # fmt: skip

    def run(name, **kw):
        vowels = lambda prompts, completions, **_: [
            sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions
        ]
        vowels.__name__ = "vowels"
        return train_grpo(
            tmp_path / name, cfg=cfg, tokenizer=tokenizer, variables=variables,
            reward={vowels: 1.0}, train_tasks=TASKS, eval_tasks=TASKS[:3],
            eval_fns={"vowels": vowels}, **kw,
        )  # fmt: skip

    one = run("one", config=config, parallel=_single())
    mesh = run("mesh", config=dataclasses.replace(config, parallel=ParallelConfig(fsdp=8)))
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "mesh")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward_mean", "loss", "kl", "completion_len_mean", "eval/vowels"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert mesh.eval == pytest.approx(one.eval, rel=1e-5)
    # Resuming on the mesh restores the sharded policy and reference: nothing left to train.
    again = run("mesh", config=dataclasses.replace(config, parallel=ParallelConfig(fsdp=8)))
    assert again.step == 2 and again.eval == pytest.approx(mesh.eval, rel=1e-6)
