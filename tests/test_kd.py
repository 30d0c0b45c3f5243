"""Logit-level distillation in SFT: a V3 teacher into a dense student (full logits and top-k),
the divergence normalised over the global trained tokens (packing and micro-batches leave loss
and gradients unchanged), self-distillation starting at zero, and a teacher with another
tokenizer refused at start."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from model import hf
from tests.conftest import tiny_config
from tests.test_dense_trainers import dense
from tests.test_sft_loss import SCHEDULE, TEXT, conversations, max_diff, packed_batch
from train.chat import render
from train.kd import KDConfig, teacher_outputs
from train.loop import LoopConfig
from train.metrics import read_metrics
from train.sft import SFTConfig, sft
from train.sft_data import SFTDataConfig
from train.state import init_state
from train.step import LossConfig, make_train_step
from train.tokenizer import train_bpe

LOOP = LoopConfig(eval_every=8, eval_batches=2, checkpoint_every=8, progress=False, plots=False)
DATA = SFTDataConfig(seq_len=63, batch_size=4, heldout_fraction=0.2)
LOSS = LossConfig(mask_documents=True, balance_weight=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 330)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """A tiny V3 teacher and a dense Qwen-style student (random), one tokenizer."""
    out = {}
    for name, cfg, seed in (
        ("teacher", tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=128), 1),
        ("student", dense("qwen", tokenizer.vocab_size), 2),
    ):
        path = tmp_path_factory.mktemp(name)
        hf.save(cfg, model.init(cfg, jax.random.key(seed)), path)
        tokenizer.save(path / "tokenizer.json")
        out[name] = path
    return out


def _kd_records(run_dir):
    return [r for r in read_metrics(run_dir) if "eval/kd" in r]


@pytest.mark.parametrize("top_k", [None, 8])
def test_a_v3_teacher_distils_into_a_dense_student(checkpoints, tmp_path, top_k):
    kd = KDConfig(teacher_hf=str(checkpoints["teacher"]), weight=1.0, beta=0.0, top_k=top_k)
    config = SFTConfig(
        hf_checkpoint=str(checkpoints["student"]), data=DATA, peak_lr=3e-3, min_lr=3e-3,
        epochs=None, loop=dataclasses.replace(LOOP, steps=16), kd=kd,
    )  # fmt: skip
    sft(config, tmp_path / "run", conversations=conversations(60))
    evals = _kd_records(tmp_path / "run")
    assert [r["step"] for r in evals] == [0, 8, 16]
    # The divergence to the teacher falls; CE is logged beside it (weight 1: not trained on).
    assert evals[-1]["eval/kd"] < 0.7 * evals[0]["eval/kd"], evals
    train = [r for r in read_metrics(tmp_path / "run") if "kd" in r and "loss" in r]
    assert len(train) == 16 and all("sft_ce" in r for r in train)
    np.testing.assert_allclose([r["loss"] for r in train], [r["kd"] for r in train], rtol=1e-5)


def test_precomputed_topk_trains_as_the_teacher_on_every_batch(checkpoints, tmp_path):
    """The teacher's top-k from disk, packed with the tokens, gives the losses of running the
    teacher on each batch; a rerun reuses the file."""
    losses = {}
    for precompute in (False, True):
        kd = KDConfig(teacher_hf=str(checkpoints["teacher"]), weight=0.6, beta=0.2, top_k=6,
                      temperature=1.5, precompute=precompute)  # fmt: skip
        config = SFTConfig(
            hf_checkpoint=str(checkpoints["student"]), data=DATA, peak_lr=3e-3, min_lr=3e-3,
            epochs=None, loop=dataclasses.replace(LOOP, steps=4, eval_every=4), kd=kd,
        )  # fmt: skip
        run_dir = tmp_path / f"precompute_{precompute}"
        sft(config, run_dir, conversations=conversations(60))
        train = [(r["loss"], r["kd"]) for r in read_metrics(run_dir) if "kd" in r]
        losses[precompute] = [x for pair in train for x in pair]
        losses[precompute] += [r["eval/kd"] for r in _kd_records(run_dir)]
        assert len(losses[precompute]) == 2 * 4 + 2
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)
    cache = tmp_path / "precompute_True" / "teacher_topk.npz"
    written = cache.stat().st_mtime_ns
    sft(config, tmp_path / "precompute_True", conversations=conversations(60))  # finished
    assert cache.stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="set top_k"):
        KDConfig(teacher_run="x", precompute=True)


def test_self_distillation_starts_at_zero_and_mixes_with_ce(checkpoints, tmp_path):
    kd = KDConfig(teacher_hf=str(checkpoints["student"]), weight=0.25, beta=0.5, temperature=2.0)
    config = SFTConfig(
        hf_checkpoint=str(checkpoints["student"]), data=DATA, peak_lr=3e-3, min_lr=3e-3,
        epochs=None, loop=dataclasses.replace(LOOP, steps=1, eval_every=1), kd=kd,
    )  # fmt: skip
    sft(config, tmp_path / "run", conversations=conversations(60))
    before = _kd_records(tmp_path / "run")[0]
    assert before["step"] == 0 and abs(before["eval/kd"]) < 1e-6
    assert before["eval/loss"] == pytest.approx(0.75 * before["eval/ce"], rel=1e-6)
    (step,) = [r for r in read_metrics(tmp_path / "run") if "kd" in r and "loss" in r]
    assert step["loss"] == pytest.approx(0.75 * step["sft_ce"] + 0.25 * step["kd"], rel=1e-5)


def test_a_teacher_with_another_tokenizer_is_refused(checkpoints, tmp_path):
    other = tmp_path / "other"
    other_tok = train_bpe(["completely different words for another vocabulary " * 30], 300)
    cfg = dense("llama", other_tok.vocab_size)
    hf.save(cfg, model.init(cfg, jax.random.key(0)), other)
    other_tok.save(other / "tokenizer.json")
    config = SFTConfig(
        hf_checkpoint=str(checkpoints["student"]), data=DATA, epochs=None,
        loop=dataclasses.replace(LOOP, steps=1), kd=KDConfig(teacher_hf=str(other)),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher's tokenizer .* is not the student's"):
        sft(config, tmp_path / "run", conversations=conversations(20))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ValueError, match="exactly one of teacher_run and teacher_hf"):
        KDConfig()
    with pytest.raises(ValueError, match="top_k"):
        KDConfig(teacher_run="x", top_k=0)


def test_the_kd_loss_is_normalised_over_the_global_batch(checkpoints, tokenizer):
    """Micro-batches (gradient accumulation) give the whole batch's loss and gradients."""
    cfg = dense("qwen", tokenizer.vocab_size)
    t_cfg = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    t_vars = model.init(t_cfg, jax.random.key(1))
    rendered = [render(c, tokenizer) for c in conversations(12, seed=3)]
    batch = packed_batch(rendered, 63, bins=2, rows=8)
    state = init_state(cfg, optax.sgd(1.0), jax.random.key(0))
    for top_k in (None, 5):
        kd = KDConfig(teacher_run="unused", weight=0.7, beta=0.3, top_k=top_k)
        full = batch | teacher_outputs(t_cfg, t_vars, kd, True)(batch)
        results = []
        for micro in (1, 2):
            loss_cfg = dataclasses.replace(LOSS, micro_batches=micro)
            step = jax.jit(make_train_step(cfg, loss_cfg, optax.sgd(1.0), SCHEDULE, kd))
            new, metrics = step(jax.tree.map(jnp.copy, state), full)
            grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)
            results.append((float(metrics["loss"]), float(metrics["kd"]), grads))
        (l1, kd1, g1), (l2, kd2, g2) = results
        assert kd1 > 0 and abs(l1 - l2) < 1e-5 and abs(kd1 - kd2) < 1e-5
        assert max_diff(g1, g2) < 1e-5
