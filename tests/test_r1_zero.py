"""The r1-zero experiment end to end at toy scale: base pre-training, GRPO per seed, the
before/after table, plots, and a rerun that reuses what is there."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import r1_zero


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


def test_r1_zero_runs_end_to_end_and_resumes(tmp_path, capsys):
    config = _tiny(r1_zero.get_config())
    summary = r1_zero.run(config, tmp_path)
    out = capsys.readouterr().out
    assert "accuracy before -> after" in out and len(out.strip().splitlines()) >= 3
    for seed in (0, 1):
        assert 0.0 <= summary[f"seed{seed}_accuracy_after"] <= 1.0
        assert (tmp_path / f"seed{seed}" / "plots" / "rewards.png").is_file()
    for name in ("accuracy.png", "reward.png", "completion_length.png"):
        assert (tmp_path / "plots" / name).is_file()
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert {"accuracy", "format", "answer_correct"} <= set(rows[0]["before"])
    # Rerunning reuses the base and the finished seeds: the same figures come back.
    again = r1_zero.run(config, tmp_path)
    assert again["seed0_accuracy_before"] == summary["seed0_accuracy_before"]
    assert again["seed1_accuracy_after"] == summary["seed1_accuracy_after"]


def test_r1_zero_config_errors():
    with pytest.raises(ValueError, match="operations"):
        dataclasses.replace(r1_zero.get_config(), operations="+/")
    with pytest.raises(ValueError, match="seeds"):
        dataclasses.replace(r1_zero.get_config(), seeds=())
