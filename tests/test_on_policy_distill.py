"""On-policy distillation at toy scale: a dense student's reverse KL to a V3 teacher falls on its
own samples, self-distillation is zero, the on-policy / fixed-completion mixture follows its
fraction, a resumed run continues exactly, and bad setups are refused."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest

import model
from rl.grpo import constant_lr
from rl.on_policy_distill import OnPolicyConfig, distill_on_policy, on_policy_at
from tests.conftest import tiny_config
from tests.test_dense_trainers import dense
from train.metrics import read_metrics
from train.run import load_run
from train.tokenizer import train_bpe

TEXT = "the cat sat on the mat. a dog ran to the log. xx yy zz " * 20
TASKS = [{"prompt": p, "completion": c} for p, c in
         (("the cat", " sat on the mat."), ("a dog", " ran to the log."), ("on the", " mat."),
          ("to the", " log."))]  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    tok = train_bpe([TEXT], 300)
    teacher_cfg = tiny_config(vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.5)
    student_cfg = dense("qwen", tok.vocab_size, init_std=0.05)
    return tok, (teacher_cfg, model.init(teacher_cfg, jax.random.key(1))), (
        student_cfg, model.init(student_cfg, jax.random.key(2))
    )  # fmt: skip


def _config(steps, **changes) -> OnPolicyConfig:
    base = OnPolicyConfig(
        optimizer=constant_lr(1e-2), steps=steps, prompts_per_step=2, samples_per_prompt=4,
        max_new_tokens=8, eval_every=1000, checkpoint_every=1000, progress=False, plots=False,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _run(tmp_path, setup, config, teacher=None, name="run"):
    tok, (t_cfg, t_vars), (s_cfg, s_vars) = setup
    t_cfg, t_vars = teacher or (t_cfg, t_vars)
    return distill_on_policy(
        tmp_path / name, student_cfg=s_cfg, student=s_vars, teacher_cfg=t_cfg, teacher=t_vars,
        tokenizer=tok, train_tasks=TASKS, config=config,
    )  # fmt: skip


def _train(run_dir):
    return [r for r in read_metrics(run_dir) if "kd" in r]


def test_the_reverse_kl_to_the_teacher_falls_on_the_students_samples(tmp_path, setup):
    _run(tmp_path, setup, _config(20, prompts_per_step=4, samples_per_prompt=8))
    records = _train(tmp_path / "run")
    assert len(records) == 20 and all(r["on_policy"] == 1.0 for r in records)
    kd = [r["kd"] for r in records]  # 3.86 -> 3.25 when measured
    assert np.mean(kd[-4:]) < 0.9 * np.mean(kd[:4]), kd
    logp = [r["teacher_logp_mean"] for r in records]
    assert np.mean(logp[-4:]) > np.mean(logp[:4])  # the teacher likes the samples more


def test_self_distillation_is_zero(tmp_path, setup):
    _, _, student = setup
    _run(tmp_path, setup, _config(1), teacher=student)
    (record,) = _train(tmp_path / "run")  # (Adam would move even a zero-gradient student)
    assert abs(record["kd"]) < 1e-6 and record["grad_norm"] < 1e-5


def test_the_mixture_trains_on_fixed_completions_and_resumes_exactly(tmp_path, setup):
    config = _config(8, on_policy_fraction=0.5, checkpoint_every=4, beta=0.5)
    flags = [on_policy_at(s, config) for s in range(1, 9)]
    assert any(flags) and not all(flags)
    _run(tmp_path, setup, config)
    records = _train(tmp_path / "run")
    assert [bool(r["on_policy"]) for r in records] == flags
    want = load_run(tmp_path / "run").variables["params"]
    # A crash after step 4's checkpoint: the rerun continues to the same weights.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
    _run(tmp_path, setup, config)
    got = load_run(tmp_path / "run").variables["params"]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bad_setups_are_refused(tmp_path, setup):
    tok, teacher, (s_cfg, s_vars) = setup
    no_completion = [{"prompt": t["prompt"]} for t in TASKS]
    with pytest.raises(ValueError, match="'completion' column"):
        distill_on_policy(
            tmp_path / "a", student_cfg=s_cfg, student=s_vars, teacher_cfg=teacher[0],
            teacher=teacher[1], tokenizer=tok, train_tasks=no_completion,
            config=_config(1, on_policy_fraction=0.5),
        )  # fmt: skip
    other = tiny_config(vocab_size=tok.vocab_size + 1)
    with pytest.raises(ValueError, match="logits"):
        _run(tmp_path, setup, _config(1), teacher=(other, model.init(other, jax.random.key(0))))
    for changes, match in (({"beta": 2.0}, "beta"), ({"on_policy_fraction": 1.5}, "fraction"),
                           ({"samples_per_prompt": 0}, "samples_per_prompt")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            _config(1, **changes)
