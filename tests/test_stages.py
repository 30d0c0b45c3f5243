"""The post-training experiments' shared stages: a stage a signal stopped ends the experiment
(never the next stage with an unfinished one), and its minutes are not marked done."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from experiments import __main__ as cli
from experiments import stages
from train.loop import Interrupted


def test_an_interrupted_grpo_stage_stops_the_experiment(monkeypatch, tmp_path):
    monkeypatch.setattr(stages, "train_grpo", lambda *a, **k: SimpleNamespace(interrupted=True))
    start = SimpleNamespace(cfg=None, tokenizer=None, variables=None)
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        stages.grpo_stage(
            stages.GRPOConfig(), start, [], {}, [], seed=0, parallel=stages.ParallelConfig(),
            run_dir=tmp_path / "rl", meta={},
        )  # fmt: skip
    monkeypatch.setattr(stages, "train_grpo", lambda *a, **k: SimpleNamespace(interrupted=False))
    stages.grpo_stage(
        stages.GRPOConfig(), start, [], {}, [], seed=0, parallel=stages.ParallelConfig(),
        run_dir=tmp_path / "rl", meta={},
    )  # fmt: skip


def test_an_interrupted_sft_stage_stops_the_experiment(monkeypatch, tmp_path):
    monkeypatch.setattr(stages, "sft", lambda *a, **k: {"interrupted": True})
    with pytest.raises(Interrupted):
        stages.sft_stage(stages.SFTConfig(), tmp_path, [], stages.ParallelConfig(), tmp_path)


def test_timings_count_a_stage_until_it_first_finishes(tmp_path):
    path = tmp_path / "timings.json"
    timed = stages.Timings(path)
    with pytest.raises(Interrupted), timed("stage 1"):
        raise Interrupted(tmp_path)
    saved = json.loads(path.read_text())
    assert "stage 1" in saved["minutes"] and saved["done"] == []  # counted, not done
    with timed("stage 1"):
        pass
    first = json.loads(path.read_text())
    assert first["done"] == ["stage 1"]
    again = stages.Timings(path)  # a rerun that only reuses the stage adds nothing
    with again("stage 1"):
        sum(range(10**6))
    assert json.loads(path.read_text()) == first


def test_the_cli_reports_an_interrupted_stage_and_exits_130(tmp_path, capsys):
    experiment = tmp_path / "stops.py"
    experiment.write_text(
        "import dataclasses\nfrom train.loop import Interrupted\n"
        "@dataclasses.dataclass(frozen=True)\nclass C:\n    x: int = 0\n"
        "def get_config():\n    return C()\n"
        "def run(config, run_dir):\n    raise Interrupted(run_dir / 'stage1')\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(experiment), "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 130
    assert "stage1 stopped on a signal" in capsys.readouterr().err


def test_the_table_marks_missing_values():
    text = stages.table({"stage 1": {"format": 0.5, "len_reasoning": 12.4, "minutes": None}})
    assert "| stage 1 |" in text and "0.50" in text and "| 12 |" in text and "| - |" in text
