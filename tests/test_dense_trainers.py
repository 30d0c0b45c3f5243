"""Every trainer with a dense GQA student as well as with V3, at toy scale: pre-training (a run
dir that resumes and generates), SFT from a Qwen2-style Hugging Face checkpoint, a reward model
from a Llama-style one, and GRPO whose training forward reproduces the sampler's log-probs
over the GQA cache."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import model
from experiments import pretrain_tiny
from model import hf
from model.config import GQAConfig, Llama3RopeScaling, ModelConfig
from rl.grpo import GRPOConfig, train_grpo
from rl.grpo_loss import GRPOLossConfig
from rl.preferences import preference_pairs
from rl.reward_data import PairDataConfig
from rl.reward_trainer import RewardModelConfig, train_reward_model
from tests.test_sft_loss import TEXT, conversations
from train.data import DataConfig
from train.loop import LoopConfig
from train.metrics import read_metrics
from train.optimizer import LRSchedule, OptimizerConfig
from train.pretrain import pretrain
from train.run import load_run
from train.sft import SFTConfig, sft
from train.sft_data import SFTDataConfig
from train.splits import Split
from train.tokenizer import train_bpe

LOOP = LoopConfig(eval_every=4, eval_batches=2, checkpoint_every=4, progress=False, plots=False)
PAIRS = preference_pairs(Split.TRAIN, 48, seed=0)


def dense(family: str, vocab: int, **changes) -> ModelConfig:
    """A tiny Qwen2-style (q/k/v biases, tied head, GQA 2:1) or Llama-style (Llama 3 rope
    scaling, untied head, one KV head) dense student."""
    qwen = family == "qwen"
    gqa = GQAConfig(
        4, 2 if qwen else 1, 8, qkv_bias=qwen,
        llama3_scaling=None if qwen else Llama3RopeScaling(8.0, 1.0, 4.0, 16),
    )  # fmt: skip
    cfg = ModelConfig(
        vocab_size=vocab, d_model=32, num_layers=2, num_dense_layers=2, dense_dim=48, mla=None,
        moe=None, gqa=gqa, tie_embeddings=qwen, max_seq_len=256, init_std=0.2,
    )  # fmt: skip
    return cfg.replace(**changes)


def _checkpoint(path, family: str, text: str):
    tokenizer = train_bpe([text], 400)
    cfg = dense(family, tokenizer.vocab_size)
    hf.save(cfg, model.init(cfg, jax.random.key(0)), path)
    tokenizer.save(path / "tokenizer.json")
    return path


def test_pretraining_a_dense_student_learns_resumes_and_generates(tmp_path):
    config = pretrain_tiny.with_steps(pretrain_tiny.get_config(), 12)
    config = dataclasses.replace(
        config, model=dense("llama", 400, init_std=0.02), data=DataConfig(seq_len=32, batch_size=4),
        loop=dataclasses.replace(config.loop, eval_every=6, eval_batches=2, checkpoint_every=6,
                                 progress=False, plots=False), vocab_size=400,
        tokenizer_sample_bytes=200_000,
    )  # fmt: skip
    pretrain(config, tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    run = load_run(tmp_path)
    assert run.cfg.gqa == config.model.gqa and run.step == 12
    again = pretrain(config, tmp_path)
    assert again["steps"] == 12  # finished: the rerun resumes at the end, trains nothing
    out = model.generate(run.cfg, run.variables, [[1, 2, 3]], max_new_tokens=4, temperature=0)
    assert np.asarray(out.tokens).shape == (1, 4)


def test_sft_from_a_dense_hf_checkpoint_learns(tmp_path):
    base = _checkpoint(tmp_path / "base", "qwen", TEXT)
    config = SFTConfig(
        hf_checkpoint=str(base), data=SFTDataConfig(seq_len=63, batch_size=4,
        heldout_fraction=0.2), peak_lr=3e-3, min_lr=3e-4, epochs=None,
        loop=dataclasses.replace(LOOP, steps=8),
    )  # fmt: skip
    done = sft(config, tmp_path / "run", conversations=conversations(60))
    assert done["steps"] == 8 and done["eval_loss"] < done["eval_loss_before"]
    run = load_run(tmp_path / "run")
    assert run.cfg.tie_embeddings and run.cfg.gqa.qkv_bias


def test_a_reward_model_from_a_dense_checkpoint_learns(tmp_path):
    text = " ".join(f"{m.content} {m.reasoning or ''}" for p in PAIRS
                    for m in (p.prompt[0], p.chosen, p.rejected))  # fmt: skip
    base = _checkpoint(tmp_path / "base", "llama", text)
    config = RewardModelConfig(
        hf_checkpoint=str(base), data=PairDataConfig(seq_len=160, batch_pairs=4,
        heldout_fraction=0.25), peak_lr=3e-3, warmup_fraction=0.0, epochs=None,
        loop=dataclasses.replace(LOOP, steps=10, eval_every=5, checkpoint_every=5),
    )  # fmt: skip
    done = train_reward_model(config, tmp_path / "rm", pairs=PAIRS)
    losses = [r["loss"] for r in read_metrics(tmp_path / "rm") if "loss" in r]
    assert done["steps"] == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])


def vowels(prompts, completions, **_):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_grpo_on_a_dense_student_reproduces_the_sampler(tmp_path, family):
    text = "the cat sat on the mat. a dog ran to the log. xx yy zz " * 20
    tokenizer = train_bpe([text], 300)
    cfg = dense(family, tokenizer.vocab_size, init_std=0.02)
    tasks = [{"prompt": p} for p in ("the cat", "a dog", "on the", "to the log")]
    lr = LRSchedule(peak_lr=1e-2, warmup_steps=0, min_lr=1e-2, final_lr=1e-2)
    config = GRPOConfig(
        loss=GRPOLossConfig(beta=0.01), optimizer=OptimizerConfig(schedule=lr, weight_decay=0.0),
        steps=3, prompts_per_step=2, group_size=4, max_new_tokens=6, eval_every=1000,
        checkpoint_every=1000, progress=False, plots=False,
    )  # fmt: skip
    variables = model.init(cfg, jax.random.key(0))
    train_grpo(
        tmp_path / "run", cfg=cfg, tokenizer=tokenizer, variables=variables, reward={vowels: 1.0},
        train_tasks=tasks, eval_tasks=tasks, eval_fns={"vowels": vowels},
        config=config,
    )  # fmt: skip
    records = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    assert len(records) == 3
    # The first step's policy is the sampler's: its training forward (no cache) gives the
    # log-probs the cached GQA decode sampled with.
    assert records[0]["sampler_logp_gap"] < 1e-4
