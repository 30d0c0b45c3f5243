"""The fp8-vs-bf16 experiment end to end at toy scale, and its gap arithmetic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import fp8_vs_bf16
from tests.test_pretrain import _tiny_pretrain
from train.metrics import MetricsWriter


def test_fp8_vs_bf16_runs_both_and_reports_the_gap(tmp_path, capsys):
    base = _tiny_pretrain(steps=6)
    # 128-wide quantization tiles need d_model >= 128 to matter; the tiny model still runs
    # every FP8 path (tiles are zero-padded).
    config = dataclasses.replace(fp8_vs_bf16.get_config(), base=base, window=2)
    summary = fp8_vs_bf16.run(config, tmp_path)
    out = capsys.readouterr().out
    assert "relative train-loss gap" in out and "V3 reports" in out
    fp8_cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())["model"]
    bf16_cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())["model"]
    assert fp8_cfg["fp8"] is not None and bf16_cfg["fp8"] is None
    assert fp8_cfg["dtype"] == bf16_cfg["dtype"] == "bfloat16"
    assert np.isfinite(summary["final_gap_pct"]) and summary["final_gap_pct"] != 0.0
    assert abs(summary["eval_gap_pct"]) < 5.0
    for name in ("loss_gap.png", "loss.png"):
        assert (tmp_path / "plots" / name).is_file()


def test_loss_gap_pairs_steps(tmp_path):
    for name, losses in (("a", {1: 2.0, 2: 1.5, 3: 1.0}), ("b", {2: 1.0, 3: 2.0, 4: 1.0})):
        with MetricsWriter(tmp_path / name, tensorboard=False) as writer:
            for step, loss in losses.items():
                writer.write(step, {"loss": loss})
    steps, gap = fp8_vs_bf16.loss_gap(tmp_path / "a", tmp_path / "b")
    assert steps.tolist() == [2, 3]
    np.testing.assert_allclose(gap, [0.5, -0.5])


def test_config_validation():
    with pytest.raises(ValueError, match="window"):
        dataclasses.replace(fp8_vs_bf16.get_config(), window=0)
