"""The r1 and v3-post-training experiments' wiring at toy scale: every stage runs in its own
run dir, the tables and plots land, stage 3 restarts from the base, stage 4 is scored by rules
and reward models, a rerun reuses every finished stage, and V3's post-training builds on the
r1 run (its base, reward models and teacher) with a generative judge among its rewards."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import distill, r1
from experiments import v3_post_training as v3
from train.metrics import read_metrics

STAGES = ("base", "stage 1", "stage 2 seed 0", "stage 3", "stage 4 seed 0", "r1-zero seed 0")


def _grpo(g):
    return dataclasses.replace(
        g, steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, eval_every=2,
        checkpoint_every=2, progress=False,
    )  # fmt: skip


def _sft(s):
    data = dataclasses.replace(s.data, seq_len=128, batch_size=2, heldout_fraction=0.3)
    return dataclasses.replace(s, epochs=None, loop=dataclasses.replace(s.loop, steps=2), data=data)


def _tiny(c: r1.R1Config) -> r1.R1Config:
    pre = dataclasses.replace(
        c.base.base, documents=400, vocab_size=384, steps=4, batch_size=2, seq_len=128
    )
    base = dataclasses.replace(c.base, base=pre, general_documents=100)
    rm = c.reward_models.rm
    rm = dataclasses.replace(
        rm, epochs=None, loop=dataclasses.replace(rm.loop, steps=2),
        data=dataclasses.replace(rm.data, batch_pairs=2),
    )  # fmt: skip
    world = dataclasses.replace(
        c.world, train_tasks=16, general_tasks=8, eval_reasoning=10, eval_general=4,
        grpo_eval=3, eval_max_new_tokens=8,
    )  # fmt: skip
    return dataclasses.replace(
        c, base=base, world=world, seeds=(0,), language_ablation=False,
        reward_models=dataclasses.replace(
            c.reward_models, helpful_pairs=16, harmless_pairs=16, rm=rm
        ),
        cold_start_samples=30, stage1=_sft(c.stage1), stage3=_sft(c.stage3),
        stage2=_grpo(c.stage2), stage4=_grpo(c.stage4), r1_zero=_grpo(c.r1_zero),
        rejection_prompts=4, stage3_general=6,
        rejection=dataclasses.replace(
            c.rejection, samples_per_prompt=2, max_new_tokens=8, progress=False
        ),
    )  # fmt: skip


@pytest.fixture(scope="module")
def r1_toy(tmp_path_factory):
    """(config, run dir) of one toy r1 run, shared by the r1 and v3 tests."""
    config, run_dir = _tiny(r1.get_config()), tmp_path_factory.mktemp("r1")
    r1.run(config, run_dir)
    return config, run_dir


@pytest.mark.slow  # every stage and a rerun: ~3 minutes on 2 cores
def test_r1_runs_every_stage_and_a_rerun_reuses_them(r1_toy, capsys):
    config, tmp_path = r1_toy
    table = (tmp_path / "table.md").read_text(encoding="utf-8")
    for stage in STAGES:
        assert f"| {stage} |" in table
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert set(rows) == set(STAGES)
    for column in ("arithmetic_en", "arithmetic_zh", "code_en", "format", "helpful", "win_rate"):
        assert all(column in row for row in rows.values())
    for name in ("accuracy.png", "reward.png", "completion_length.png", "language.png"):
        assert (tmp_path / "plots" / name).is_file()
    # R1 retrains its base on the rejection-sampled data, not the RL model.
    stage3 = json.loads((tmp_path / "stage3" / "config.json").read_text())
    assert stage3["init_from"] == str(tmp_path / "base")
    assert (tmp_path / "stage3_samples" / "stats.json").is_file()
    # Stage 4 trains on reasoning and general prompts, with rules and both reward models.
    stage4 = json.loads((tmp_path / "stage4_seed0" / "config.json").read_text())
    assert set(stage4["reward"]) == {"accuracy", "format", "language", "helpful", "harmless"}
    zero = json.loads((tmp_path / "r1zero_seed0" / "config.json").read_text())
    assert set(zero["reward"]) == {"accuracy", "format"}
    for run in ("stage2_seed0", "stage4_seed0", "r1zero_seed0"):
        steps = [r["step"] for r in read_metrics(tmp_path / run) if "reward_mean" in r]
        assert steps == [1, 2], run
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings["done"]) >= {"base", "stage 1", "stage 3", "stage 4 seed 0"}
    # A rerun trains nothing: the same table, the recorded minutes unchanged.
    r1.run(config, tmp_path)
    assert table.strip() in capsys.readouterr().out  # the table is printed
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == table
    assert json.loads((tmp_path / "timings.json").read_text()) == timings


@pytest.mark.slow  # V3's stages on the toy r1 run: ~2 minutes on 2 cores
def test_v3_post_training_builds_on_the_r1_run(r1_toy, tmp_path):
    r1_config, r1_dir = r1_toy
    c = v3.get_config()
    config = dataclasses.replace(
        c, r1=r1_config, r1_run=str(r1_dir), reasoning_prompts=4, general_conversations=6,
        rejection=dataclasses.replace(
            c.rejection, samples_per_prompt=2, max_new_tokens=8, progress=False
        ),
        sft=_sft(c.sft), judge=_sft(c.judge), judge_pairs=20, judge_max_new_tokens=8,
        rl=_grpo(c.rl),
    )  # fmt: skip
    v3.run(config, tmp_path)
    table = (tmp_path / "table.md").read_text(encoding="utf-8")
    for stage in ("base", "r1 stage2_seed0", "sft", "rl seed 0"):
        assert f"| {stage} |" in table
    # The reasoning data came from the r1 teacher, and SFT started from r1's base.
    samples = json.loads((tmp_path / "samples" / "config.json").read_text())
    assert samples["policy"]["checkpoint"] == str(r1_dir / "stage2_seed0")
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["init_from"] == str(
        r1_dir / "base"
    )
    rl_config = json.loads((tmp_path / "rl_seed0" / "config.json").read_text())
    assert set(rl_config["reward"]) == {
        "accuracy", "format", "language", "helpful", "harmless", "judge",
    }  # fmt: skip
    steps = [r for r in read_metrics(tmp_path / "rl_seed0") if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]


@pytest.mark.slow  # two tiny students through every distillation stage: ~3 minutes on 2 cores
def test_distill_teaches_dense_students_from_the_r1_teacher(r1_toy, tmp_path):
    r1_config, r1_dir = r1_toy
    c = distill.get_config()
    on_policy = dataclasses.replace(
        c.on_policy, steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8,
        eval_every=2, checkpoint_every=2, progress=False, plots=False,
    )  # fmt: skip
    config = dataclasses.replace(
        c, r1=r1_config, r1_run=str(r1_dir), reasoning_prompts=4, general_conversations=6,
        rejection=dataclasses.replace(
            c.rejection, samples_per_prompt=2, max_new_tokens=8, progress=False
        ),
        sft=_sft(c.sft), on_policy=on_policy, grpo=_grpo(c.grpo),
    )  # fmt: skip
    distill.run(config, tmp_path)
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    for student in ("qwen-tiny", "llama-tiny"):
        for stage in ("base", "seq-SFT", "logit KD", "on-policy", "GRPO"):
            row = rows[f"{student} {stage}"]
            assert row["student_pflops"] > 0 and "arithmetic_en" in row, (student, stage)
        # Logit KD and on-policy distillation ran the teacher; seq-SFT and GRPO did not.
        assert rows[f"{student} logit KD"]["teacher_pflops"] > 0
        assert rows[f"{student} on-policy"]["teacher_pflops"] > 0
        assert rows[f"{student} seq-SFT"]["teacher_pflops"] == 0
        # The students share the r1 base's tokenizer and are dense GQA models.
        base = json.loads((tmp_path / student / "base" / "config.json").read_text())
        assert base["model"]["gqa"] is not None and base["model"]["mla"] is None
        assert (tmp_path / student / "base" / "tokenizer.json").read_bytes() == (
            r1_dir / "base" / "tokenizer.json"
        ).read_bytes()
        kd = json.loads((tmp_path / student / "logit_kd" / "config.json").read_text())
        assert kd["kd"]["teacher_run"] == str(r1_dir / "stage2_seed0")
        assert [r["step"] for r in read_metrics(tmp_path / student / "on_policy")
                if "kd" in r] == [1, 2]  # fmt: skip
    assert "| qwen-tiny logit KD |" in (tmp_path / "table.md").read_text(encoding="utf-8")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="stage3_init"):
        dataclasses.replace(r1.get_config(), stage3_init="stage2")
    with pytest.raises(ValueError, match=r"stage4_rewards.*judge"):
        dataclasses.replace(r1.get_config(), stage4_rewards={"judge": 1.0})
    with pytest.raises(ValueError, match="seeds"):
        dataclasses.replace(r1.get_config(), seeds=())
