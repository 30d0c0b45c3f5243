"""The r1-zero experiment end to end at toy scale: base pre-training, GRPO per seed, the
before/after table, plots, and a rerun that reuses what is there."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import r1_zero
from rl import tasks
from train import arithmetic
from train.metrics import read_metrics
from train.splits import Split


def _tiny(config: r1_zero.R1ZeroConfig) -> r1_zero.R1ZeroConfig:
    base = dataclasses.replace(
        config.base, documents=400, vocab_size=320, steps=4, batch_size=2, seq_len=128
    )
    grpo = dataclasses.replace(
        config.grpo, steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8,
        eval_every=2, checkpoint_every=2, progress=False,
    )  # fmt: skip
    return dataclasses.replace(
        config, base=base, grpo=grpo, train_tasks=8, eval_tasks=4, seeds=(0, 1)
    )


@pytest.mark.slow  # both stages and a rerun: ~3 minutes on 2 cores
def test_r1_zero_runs_end_to_end_and_resumes(tmp_path, capsys):
    config = _tiny(r1_zero.get_config())
    summary = r1_zero.run(config, tmp_path)
    out = capsys.readouterr().out
    assert "accuracy before -> after" in out and len(out.strip().splitlines()) >= 3
    # Greedy evaluation of one base on one task set: the seeds cannot disagree before RL.
    assert summary["seed0_accuracy_before"] == summary["seed1_accuracy_before"]
    for seed in (0, 1):
        assert (tmp_path / f"seed{seed}" / "plots" / "rewards.png").is_file()
    for name in ("accuracy.png", "reward.png", "completion_length.png"):
        assert (tmp_path / "plots" / name).is_file()
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert {"accuracy", "format", "answer_correct"} <= set(rows[0]["before"])
    # Stage 2 ran GRPO on each seed: both update steps logged, and "after" is the held-out
    # evaluation of the last step's policy. (At this scale every reward is 0, so the updates
    # carry no signal: learning itself is shown by the full run's table in the module doc.)
    for row in rows:
        records = read_metrics(tmp_path / f"seed{row['seed']}")
        steps = [r for r in records if "reward_mean" in r]
        assert [r["step"] for r in steps] == [1, 2]
        assert all(np.isfinite(r["loss"]) and "zero_std_groups" in r for r in steps)
        last = [r for r in records if r["step"] == 2 and "eval/accuracy" in r][-1]
        assert row["after"] == {k: last[f"eval/{k}"] for k in row["after"]}
    # Rerunning reuses the base and the finished seeds: the same figures come back.
    again = r1_zero.run(config, tmp_path)
    assert again["seed0_accuracy_before"] == summary["seed0_accuracy_before"]
    assert again["seed1_accuracy_after"] == summary["seed1_accuracy_after"]


@pytest.mark.parametrize(
    ("style", "expected"),
    [  # (accuracy, format, answer_correct) of each base-corpus answer style
        (tasks.REASONED, (1.0, 1.0, 1.0)),
        (tasks.ANSWER_ONLY, (0.0, 0.0, 1.0)),  # right number, no reasoning: no reward
        (tasks.PLAIN, (0.0, 0.0, 1.0)),
    ],
)
def test_the_experiment_scores_only_reasoned_right_answers(style, expected):
    # The experiment's own scorers on its own held-out problems: a reward that paid for the
    # bare answer, or for the number anywhere, would make "accuracy" measure the wrong thing.
    config = r1_zero.get_config()
    problems = arithmetic.generate(
        Split.HELDOUT, 30, 0, max_digits=config.max_digits, operations=config.ops()
    )
    prompts = [tasks.arithmetic_prompt(p) for p in problems]
    answer = [p.answer for p in problems]
    right = [tasks.respond(p, style) for p in problems]
    for name, want in zip(("accuracy", "format", "answer_correct"), expected, strict=True):
        assert r1_zero.EVAL_FNS[name](prompts, right, answer=answer) == [want] * 30, name
    # An answer off by one in the same format earns the format but never the accuracy.
    wrong_answer = [dataclasses.replace(p, answer=p.answer + 1) for p in problems]
    wrong = [tasks.respond(p, tasks.REASONED) for p in wrong_answer]
    assert r1_zero.EVAL_FNS["accuracy"](prompts, wrong, answer=answer) == [0.0] * 30
    assert r1_zero.EVAL_FNS["format"](prompts, wrong, answer=answer) == [1.0] * 30


def test_r1_zero_config_errors():
    with pytest.raises(ValueError, match="operations"):
        dataclasses.replace(r1_zero.get_config(), operations="+/")
    with pytest.raises(ValueError, match="seeds"):
        dataclasses.replace(r1_zero.get_config(), seeds=())
