"""Run-dir guard: config differences by dotted path, safe changes allowed and recorded,
state-changing ones refused before anything is written, for pre-training and GRPO."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import pytest

import model
from rl.grpo import GRPOConfig, train_grpo
from rl.grpo_loss import GRPOLossConfig
from tests.conftest import tiny_config
from train.run_dir import (
    CHANGES_FILE,
    CONFIG_FILE,
    ConfigMismatchError,
    check_run_dir,
    config_changes,
    write_config,
)
from train.tokenizer import train_bpe

OLD = {"model": {"d_model": 32, "mla": {"heads": 2}}, "loop": {"steps": 3}, "lr": math.nan}


def test_config_changes_name_each_leaf_by_dotted_path():
    new = {"model": {"d_model": 64, "mla": {"heads": 2, "rank": 4}}, "loop": {"steps": 6}}
    changes = {c.path: (c.old, c.new) for c in config_changes(OLD, new | {"lr": math.nan})}
    assert changes == {
        "model.d_model": (32, 64),
        "model.mla.rank": ("<absent>", 4),
        "loop.steps": (3, 6),
    }  # NaN equals NaN: no change
    assert config_changes({"a": (1, 2)}, {"a": [1, 2]}) == []


def test_safe_changes_pass_and_are_recorded(tmp_path, caplog):
    write_config(tmp_path, OLD, [])
    new = OLD | {"loop": {"steps": 6}}
    changes = check_run_dir(tmp_path, new, safe=("loop",), allow_change=False, override="X")
    assert [str(c) for c in changes] == ["loop.steps: 3 -> 6"]
    assert "resuming with loop.steps: 3 -> 6" in caplog.text
    write_config(tmp_path, new, changes)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["loop"] == {"steps": 6}
    record = json.loads((tmp_path / CHANGES_FILE).read_text())
    assert record["changes"] == [{"path": "loop.steps", "old": 3, "new": 6}]


def test_unsafe_changes_are_refused_unless_allowed(tmp_path):
    write_config(tmp_path, OLD, [])
    new = OLD | {"model": {"d_model": 64, "mla": {"heads": 2}}}
    with pytest.raises(ConfigMismatchError, match=r"model.d_model: 32 -> 64[\s\S]*set X"):
        check_run_dir(tmp_path, new, safe=("loop",), allow_change=False, override="X")
    changes = check_run_dir(tmp_path, new, safe=("loop",), allow_change=True, override="X")
    assert [c.path for c in changes] == ["model.d_model"]
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigMismatchError, match="not readable JSON"):
        check_run_dir(tmp_path, OLD, safe=(), allow_change=False, override="X")


def _vowels(prompts, completions, **_):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def _files(run_dir) -> dict:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "tensorboard" not in p.parts
    }


def test_grpo_run_dir_is_guarded(tmp_path):
    tokenizer = train_bpe(["the cat sat on the mat. a dog ran. " * 20], 300)
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, init_std=0.02)
    variables = model.init(cfg, jax.random.key(0))
    tasks = [{"prompt": p} for p in ("the cat", "a dog")]
    config = GRPOConfig(
        loss=GRPOLossConfig(beta=0.0), steps=1, prompts_per_step=2, group_size=2,
        max_new_tokens=4, progress=False, plots=False,
    )  # fmt: skip

    def run(config, train_tasks=tasks):
        return train_grpo(
            tmp_path, cfg=cfg, tokenizer=tokenizer, variables=variables,
            reward={_vowels: 1.0}, train_tasks=train_tasks, config=config,
        )  # fmt: skip

    run(config)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["grpo"]["group_size"] == 2 and saved["reward"] == {"_vowels": 1.0}
    before = _files(tmp_path)
    with pytest.raises(ConfigMismatchError, match=r"grpo\.group_size: 2 -> 4"):
        run(dataclasses.replace(config, group_size=4))
    with pytest.raises(ConfigMismatchError, match=r"train_tasks.count: 2 -> 1[\s\S]*grpo.allow"):
        run(config, tasks[:1])
    assert _files(tmp_path) == before
    assert run(dataclasses.replace(config, steps=2)).step == 2  # a safe change resumes
