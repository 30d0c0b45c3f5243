"""A short pre-training run end to end, through the experiment runner, then a YaRN stage."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import extend_context, pretrain_tiny
from experiments.__main__ import main
from tests.conftest import tiny_config
from train.data import DataConfig
from train.pretrain import PretrainConfig, evaluate_run
from train.run import load_run

_DEFAULT = pretrain_tiny.get_config()


def _tiny_pretrain(steps: int = 4, base: PretrainConfig = _DEFAULT) -> PretrainConfig:
    """`base` (default: pretrain-tiny's config) shrunk to a tiny model, data and loop."""
    config = pretrain_tiny.with_steps(base, steps)
    return dataclasses.replace(
        config,
        model=tiny_config(max_seq_len=256),
        data=DataConfig(seq_len=32, batch_size=2),
        loop=dataclasses.replace(
            config.loop, eval_every=2, eval_batches=2, checkpoint_every=2, progress=False
        ),
        vocab_size=400,
        tokenizer_sample_bytes=200_000,
    )


def test_pretrain_writes_the_documented_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain_tiny, "get_config", _tiny_pretrain)
    assert main(["pretrain-tiny", "--run-dir", str(tmp_path)]) == 0
    for name in ("tokenizer.json", "config.json", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert plots >= {"loss.png", "learning_rate.png", "expert_load.png", "maxvio.png"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_ce"] > 0

    # The weights evaluate under a YaRN-extended config at a longer length.
    stage = extend_context._stage(
        extend_context.ExtendConfig(factor=4.0), _tiny_pretrain(), 64, 2, str(tmp_path)
    )
    stage = dataclasses.replace(stage, data=dataclasses.replace(stage.data, batch_size=1))
    losses = evaluate_run(tmp_path, stage, seq_len=64, batches=1)
    assert losses["ce"] > 0

    # The run generates from the command line with its latest weights and tokenizer.
    capsys.readouterr()
    argv = ["generate", "--ckpt", str(tmp_path), "--prompt", "1 + 2 =", "--max-new-tokens", "5"]
    assert main([*argv, "--no-stop", "--num-samples", "2", "--temperature", "1"]) == 0
    out = capsys.readouterr().out
    assert "at step 4" in out and "sample 1 (length)" in out and "--- 10 tokens" in out

    # A rerun with another model is refused before it writes anything.
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # the CLI's error: no traceback, exit 2
        main(["pretrain-tiny", "--run-dir", str(tmp_path), "--set", "model.d_model=64"])
    assert exited.value.code == 2
    assert "model.d_model: 32 -> 64" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_load_run_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no readable 'model' section"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"d_model": 8}}))
    with pytest.raises(ValueError, match="not a ModelConfig"):
        load_run(tmp_path)


def test_pretrain_config_validation():
    with pytest.raises(ValueError, match="mask_documents"):
        dataclasses.replace(_tiny_pretrain(), data=DataConfig(seq_len=32, mask_documents=True))
    with pytest.raises(ValueError, match="max_seq_len"):
        dataclasses.replace(_tiny_pretrain(), data=DataConfig(seq_len=4096))
