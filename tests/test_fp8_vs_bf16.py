"""The fp8-vs-bf16 experiment end to end at toy scale, and its gap arithmetic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import fp8_vs_bf16
from model import presets
from tests.test_pretrain import _tiny_pretrain
from train.data import DataConfig
from train.metrics import MetricsWriter


def test_fp8_vs_bf16_runs_both_and_reports_the_gap(tmp_path, capsys):
    # v3-tiny's widths (d_model 128), so V3's 1 x 128 and 128 x 128 tiles are real tiles.
    base = _tiny_pretrain(steps=2)
    base = dataclasses.replace(
        base,
        model=presets.get("v3-tiny").replace(max_seq_len=256),
        data=DataConfig(seq_len=64, batch_size=4),
    )
    config = dataclasses.replace(fp8_vs_bf16.get_config(), base=base, window=1)
    summary = fp8_vs_bf16.run(config, tmp_path)
    out = capsys.readouterr().out
    assert "relative train-loss gap" in out and "V3 reports" in out
    fp8_cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())["model"]
    bf16_cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())["model"]
    assert fp8_cfg["fp8"] is not None and bf16_cfg["fp8"] is None
    assert fp8_cfg["dtype"] == bf16_cfg["dtype"] == "bfloat16"
    # Step 1 is the one step where both runs hold the same weights and batch, so its gap is
    # quantization alone: under V3's 0.25% (measured +0.02%). Later steps are not bounded
    # here: at this scale the runs drift apart by more than FP8 costs (steps 3-4 measured
    # +0.31%, +0.43%; E5M2 or a fixed scale instead of E4M3 per-tile scales gave smaller gaps
    # by chance), so the loss cannot tell a right FP8 recipe from a wrong one at toy scale.
    # The numerics are pinned by tests/test_fp8_gemm.py (15 and 19 failures under those two
    # mutations) and test_fp8_linear.py's model switch; V3's bound over a whole run is the
    # experiment's (its docstring: +0.15% at step 800, held-out -0.04%).
    steps, gap = fp8_vs_bf16.loss_gap(tmp_path / "fp8", tmp_path / "bf16")
    assert steps.tolist() == [1, 2] and gap[0] != 0.0
    assert abs(gap[0]) < 0.0025, gap
    assert np.isfinite(summary["eval_gap_pct"]) and np.isfinite(summary["final_gap_pct"])
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
