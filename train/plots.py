"""PNG plots of a run's metrics.jsonl (losses, learning rate, expert load, MaxVio) and of runs side
by side.

Figures are built with `matplotlib.figure.Figure`, never pyplot: nothing opens a window and a
notebook's own backend is left alone. A plot whose metrics a run did not log is skipped with a
log line, so the same `make_plots` serves pre-training, SFT and RL runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from train.metrics import read_metrics

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
Records = Sequence[Mapping[str, Any]]


def metric_series(records: Records, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps [N] and float64 values [N, ...] of the records that have `key`."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    steps = np.array([step for step, _ in pairs], dtype=np.int64)
    try:
        values = np.array([value for _, value in pairs], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"metric {key!r} does not have the same shape at every step") from e
    return steps, values


def mean_over_layers(values: np.ndarray) -> np.ndarray:
    """[N] as is, [N, ...] -> [N] mean over everything but the step axis, NaNs ignored."""
    if values.ndim <= 1:
        return values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN step stays NaN, quietly
        return np.nanmean(values.reshape(len(values), -1), axis=1)


def _figure() -> Figure:
    return Figure(figsize=(7.5, 4.5), layout="constrained")


def _log_y_if_wide(ax: Any, *series: np.ndarray) -> None:
    # Losses falling over orders of magnitude read better on a log axis; narrow ranges do not.
    finite = np.concatenate([s[np.isfinite(s)] for s in series])
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
        ax.set_yscale("log")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _skip(path: Path, missing: str) -> None:
    log.info("skipping %s: no %s in the metrics", path.name, missing)


def plot_loss(records: Records, path: Path) -> Path | None:
    """Train CE and MTP loss as lines, eval CE and MTP loss as markers (train `loss` if no CE)."""
    names = ["ce", "mtp_loss"]
    if not any(metric_series(records, n)[0].size for n in names):
        names = ["loss"]
    fig = _figure()
    ax = fig.add_subplot()
    plotted = []
    for color, name in zip(("C0", "C1"), names, strict=False):
        steps, values = metric_series(records, name)
        if steps.size:
            ax.plot(steps, values, color=color, lw=1.2, label=f"train {name}")
            plotted.append(values)
        steps, values = metric_series(records, f"eval/{name}")
        if steps.size:
            ax.plot(steps, values, "o", color=color, mec="k", ms=5, label=f"eval {name}")
            plotted.append(values)
    if not plotted:
        _skip(path, "ce, mtp_loss or loss")
        return None
    _log_y_if_wide(ax, *plotted)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def plot_learning_rate(records: Records, path: Path) -> Path | None:
    """Learning rate over steps."""
    steps, values = metric_series(records, "learning_rate")
    if not steps.size:
        _skip(path, "learning_rate")
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, values, color="C2")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_expert_load(records: Records, path: Path) -> Path | None:
    """Heatmap [MoE layer x expert] of each layer's token fraction at the last logged step."""
    # Only the last record matters, so a run whose expert count changed still plots.
    last = next((r for r in reversed(records) if "expert_load" in r), None)
    counts = np.asarray(last["expert_load"] if last else [], dtype=np.float64)
    if counts.ndim != 2:
        _skip(path, "[L, E] expert_load")
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = counts / counts.sum(axis=1, keepdims=True)
    num_layers, num_experts = counts.shape
    fig = Figure(figsize=(min(12.0, 6 + 0.05 * num_experts), min(9.0, 3 + 0.2 * num_layers)))
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fraction, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("fraction of the layer's routed tokens")
    title = (
        f"Expert load at step {last['step']} (uniform = 1/{num_experts} = {1 / num_experts:.3g})"
    )
    ax.set(xlabel="expert", ylabel="MoE layer", title=title)
    if num_layers <= 16:
        ax.set_yticks(range(num_layers))
    return _save(fig, path)


def plot_maxvio(records: Records, path: Path) -> Path | None:
    """MaxVio over steps: a thin line per MoE layer and their mean."""
    steps, values = metric_series(records, "maxvio")
    if not steps.size:
        _skip(path, "maxvio")
        return None
    per_layer = values.reshape(len(values), -1)
    num_layers = per_layer.shape[1]
    fig = _figure()
    ax = fig.add_subplot()
    colors = [f"{c:.2f}" for c in np.linspace(0.2, 0.75, num_layers)]  # grays, dark = first
    for layer in range(num_layers):
        # Past a handful of layers a legend entry each is noise; the first one names them all.
        if num_layers <= 8:
            label = f"layer {layer}"
        else:
            label = f"layers 0-{num_layers - 1} (dark to light)" if layer == 0 else None
        ax.plot(steps, per_layer[:, layer], color=colors[layer], lw=0.8, label=label)
    ax.plot(steps, mean_over_layers(per_layer), color="C3", lw=2, label="mean over layers")
    ax.set(xlabel="step", ylabel="MaxVio (max load / mean load - 1)", title="Expert imbalance")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2 if num_layers > 4 else 1)
    return _save(fig, path)


def _lines(records: Records, keys: Sequence[str], path: Path, ylabel: str, title: str):
    """One line per key that the run logged (markers when few points); None if none did."""
    fig = _figure()
    ax = fig.add_subplot()
    plotted = 0
    for key in keys:
        steps, values = metric_series(records, key)
        if steps.size:
            ax.plot(
                steps, values, marker="o" if steps.size <= 30 else None, ms=3, lw=1.2, label=key
            )
            plotted += 1
    if not plotted:
        _skip(path, " / ".join(keys))
        return None
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _keys_with(records: Records, prefix: str, exclude: Sequence[str] = ()) -> list[str]:
    keys = {k for r in records for k in r if k.startswith(prefix) and k not in exclude}
    return sorted(keys)


def plot_rewards(records: Records, path: Path) -> Path | None:
    """RL: mean rollout reward and each reward function's mean over steps."""
    keys = ["reward_mean", *_keys_with(records, "reward/")]
    return _lines(records, keys, path, "mean over the step's samples", "Rollout rewards")


def plot_eval_scores(records: Records, path: Path) -> Path | None:
    """RL: held-out scores of greedy completions (accuracy, format, ...) over steps."""
    keys = _keys_with(records, "eval/", exclude=("eval/completion_len", *_EVAL_LOSSES))
    return _lines(records, keys, path, "held-out mean (greedy)", "Held-out scores")


_EVAL_LOSSES = ("eval/ce", "eval/mtp_loss", "eval/loss")


def plot_completion_length(records: Records, path: Path) -> Path | None:
    """RL: completion length in tokens (rollout mean and max, held-out greedy mean)."""
    keys = ["completion_len_mean", "completion_len_max", "eval/completion_len"]
    return _lines(records, keys, path, "tokens", "Completion length")


_PLOTS: dict[str, Callable[[Records, Path], Path | None]] = {
    "loss.png": plot_loss,
    "learning_rate.png": plot_learning_rate,
    "expert_load.png": plot_expert_load,
    "maxvio.png": plot_maxvio,
    "rewards.png": plot_rewards,
    "eval_scores.png": plot_eval_scores,
    "completion_length.png": plot_completion_length,
}


def make_plots(run_dir: str | os.PathLike) -> list[Path]:
    """Write the PNGs of _PLOTS whose metrics the run logged (loss, learning_rate,
    expert_load, maxvio; RL: rewards, eval_scores, completion_length) to run_dir/plots;
    returns the paths."""
    records = read_metrics(run_dir)
    out_dir = Path(run_dir) / PLOTS_DIR
    made = [plot(records, out_dir / name) for name, plot in _PLOTS.items()]
    return [path for path in made if path is not None]


def compare_runs(
    run_dirs: Mapping[str, str | os.PathLike],
    metric: str,
    out_path: str | os.PathLike,
    *,
    prefix: str = "",
) -> Path:
    """Plot `prefix + metric` over steps for each labelled run (list metrics: mean over layers)."""
    key = prefix + metric
    fig = _figure()
    ax = fig.add_subplot()
    plotted, averaged = [], False
    for label, run_dir in run_dirs.items():
        steps, values = metric_series(read_metrics(run_dir), key)
        if not steps.size:
            log.warning("compare_runs: run %r (%s) has no %r; left out", label, run_dir, key)
            continue
        averaged |= values.ndim > 1
        curve = mean_over_layers(values)
        ax.plot(steps, curve, lw=1.2, label=label)
        plotted.append(curve)
    if not plotted:
        raise ValueError(f"none of the runs {list(run_dirs)} logged metric {key!r}")
    _log_y_if_wide(ax, *plotted)
    ylabel = f"{key} (mean over layers)" if averaged else key
    ax.set(xlabel="step", ylabel=ylabel, title=f"{key} across runs")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, Path(out_path))
