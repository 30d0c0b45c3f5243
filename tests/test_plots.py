"""Plots from a synthetic run: the four PNGs, skipped plots, series helpers, run comparison."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from matplotlib.image import imread

from train.metrics import MetricsWriter
from train.plots import compare_runs, make_plots, mean_over_layers, metric_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(run_dir, *, steps=60, layers=3, experts=8, imbalance=1.0, seed=0):
    """A pre-training-like metrics.jsonl: warmup-cosine LR, falling losses, MoE stats."""
    rng = np.random.default_rng(seed)
    with MetricsWriter(run_dir, tensorboard=False) as writer:
        for step in range(steps):
            lr = 3e-4 * min(1.0, (step + 1) / 10) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
            skew = imbalance * np.exp(-step / 20) + 0.05
            counts = rng.poisson(100 * np.exp(skew * rng.normal(size=(layers, experts))))
            metrics = {
                "loss": 11.0 * np.exp(-step / 15) + 3.0,
                "ce": 10.0 * np.exp(-step / 15) + 2.5,
                "mtp_loss": 10.5 * np.exp(-step / 15) + 2.9,
                "learning_rate": lr,
                "maxvio": (counts.max(1) / counts.mean(1) - 1),
                "maxvio_mean": float((counts.max(1) / counts.mean(1) - 1).mean()),
            }
            if step % 10 == 9:
                metrics["expert_load"] = counts
                writer.write(step, {"ce": metrics["ce"] + 0.1, "mtp_loss": 3.5}, prefix="eval/")
            writer.write(step, metrics)


def test_make_plots_writes_four_readable_pngs(tmp_path):
    _synthetic_run(tmp_path)
    paths = make_plots(tmp_path)
    names = ["loss.png", "learning_rate.png", "expert_load.png", "maxvio.png"]
    assert paths == [tmp_path / "plots" / name for name in names]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = imread(path).shape
        assert height > 200 and width > 300


def test_missing_metrics_skip_plots_with_a_note(tmp_path, caplog):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(5):
            writer.write(step, {"loss": 1.0 / (step + 1), "grad_norm": 0.5})
    with caplog.at_level(logging.INFO, logger="train.plots"):
        paths = make_plots(tmp_path)
    assert [p.name for p in paths] == ["loss.png"]  # falls back to the total loss
    skipped = " ".join(r.getMessage() for r in caplog.records)
    for name in ["learning_rate.png", "expert_load.png", "maxvio.png"]:
        assert f"skipping {name}" in skipped


def test_metric_series_and_mean_over_layers():
    records = [
        {"step": 0, "maxvio": [1.0, 3.0]},
        {"step": 1, "loss": 2.0},
        {"step": 2, "maxvio": [float("nan"), 5.0]},
    ]
    steps, values = metric_series(records, "maxvio")
    np.testing.assert_array_equal(steps, [0, 2])
    assert values.shape == (2, 2)
    np.testing.assert_allclose(mean_over_layers(values), [2.0, 5.0])  # NaN layer ignored
    assert metric_series(records, "absent")[0].size == 0
    with pytest.raises(ValueError, match="same shape"):
        metric_series([*records, {"step": 3, "maxvio": [1.0]}], "maxvio")


def test_compare_runs_plots_each_run_and_skips_runs_without_the_metric(tmp_path, caplog):
    runs = {}
    for i, name in enumerate(["aux_loss", "loss_free", "none"]):
        runs[name] = tmp_path / name
        _synthetic_run(runs[name], steps=20, imbalance=0.5 + i, seed=i)
    runs["no_moe"] = tmp_path / "no_moe"
    with MetricsWriter(runs["no_moe"], tensorboard=False) as writer:
        writer.write(0, {"loss": 1.0})
    with caplog.at_level(logging.WARNING, logger="train.plots"):
        out = compare_runs(runs, "maxvio", tmp_path / "sweep" / "maxvio.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "'no_moe'" in caplog.text
    with pytest.raises(ValueError, match="eval/maxvio"):
        compare_runs(runs, "maxvio", tmp_path / "x.png", prefix="eval/")
