"""Training metrics: JSON Lines + TensorBoard writer, resume-aware reader, MaxVio, throughput/MFU.

File conventions (`run_dir/metrics.jsonl`, one JSON object per `MetricsWriter.write` call):
- keys are `step` (int) and the metric names with the write's prefix prepended (`eval/ce`);
- integers stay ints, every other number becomes a Python float;
- arrays become nested lists ([L] MaxVio, [L, E] expert counts), at most `MAX_ARRAY_SIZE` items;
- NaN and ±inf are written as the strings "NaN", "Infinity", "-Infinity" (also inside lists):
  strict JSON has no such numbers, and strings keep a diverged loss (NaN) distinct from an
  overflow (inf), which null would not. `read_metrics` turns them back into floats.
- a record's *stream* is the `dir/` prefix its metric keys share ("" for train, "eval/" for
  eval); steps grow within a stream, and a resumed run that rewrites step s supersedes the
  stream's earlier records from step s on (see `read_metrics`).

TensorBoard (`run_dir/tensorboard/`) gets scalars as they are and 1-D arrays as one scalar per
index, `maxvio/layer_3` (axis 0 of the train loop's arrays is the MoE layer); arrays with two
or more dimensions (expert load) go to the JSONL file and the plots only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Guards against logging a weight tensor by mistake; V3's [58, 256] expert counts fit.
MAX_ARRAY_SIZE = 1 << 16
_ENCODE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_DECODE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _as_array(name: str, value: Any) -> np.ndarray:
    """A metric as an int64 or float64 array, with errors that name the metric."""
    arr = np.asarray(value)
    if arr.dtype.kind in "cmMOSU":
        raise TypeError(f"metric {name!r}: expected a real number or array, got dtype {arr.dtype}")
    if arr.size > MAX_ARRAY_SIZE:
        raise ValueError(
            f"metric {name!r}: array of shape {arr.shape} has {arr.size} items, more than "
            f"MAX_ARRAY_SIZE={MAX_ARRAY_SIZE}; log a summary of it instead"
        )
    # float64 also covers bfloat16/float8 (numpy kind "V"), whose tolist() is not plain floats.
    return arr.astype(np.int64 if arr.dtype.kind in "biu" else np.float64)


def _encode(value: Any) -> Any:
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else _ENCODE[value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, str):
        return _DECODE.get(value, value)
    return value


def stream_of(record: Mapping[str, Any]) -> str:
    """The `dir/` prefix shared by all metric keys of a record: "" for train, "eval/" for eval."""
    dirs = [key.split("/")[:-1] for key in record if key != "step"]
    common: list[str] = []
    for parts in zip(*dirs, strict=False):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    return "".join(part + "/" for part in common)


def _drop_partial_last_line(path: Path) -> None:
    """Cut bytes after the last newline (a write cut short by a crash) so appends stay valid."""
    with path.open("rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos, block = end, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            pos = start
        else:
            keep = 0
        if keep < end:
            log.warning("%s: dropping %d bytes of a partly written last line", path, end - keep)
            f.truncate(keep)


class MetricsWriter:
    """Appends metrics to `run_dir/metrics.jsonl` and TensorBoard; reopening a run dir resumes."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.resumed = self.path.exists() and self.path.stat().st_size > 0
        if self.resumed:
            _drop_partial_last_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = tensorboard
        self._tb: Any = None
        self._last_step: dict[str, int] = {}
        if tensorboard:
            # Imported here so the JSONL path works without tensorboardX; fail at construction.
            import tensorboardX  # noqa: F401

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
        """Append one record {step, prefix+name: value}; returns the record as written."""
        if self._file.closed:
            raise ValueError(f"MetricsWriter for {self.run_dir} is closed")
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"prefix must be '' or end with '/', e.g. 'eval/'; got {prefix!r}")
        if not metrics:
            raise ValueError(f"no metrics given for step {step}")
        record: dict[str, Any] = {"step": int(step)}
        arrays: dict[str, np.ndarray] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name or name == "step":
                raise ValueError(
                    f"metric names must be non-empty strings other than 'step': {name!r}"
                )
            key = prefix + name
            arrays[key] = _as_array(key, value)
            record[key] = _encode(arrays[key].tolist())
        stream = stream_of(record)
        last = self._last_step.get(stream)
        # A repeated or earlier step would supersede the earlier record in read_metrics,
        # silently losing it; within one run that is a bug in the caller, so say so.
        if last is not None and step <= last:
            raise ValueError(
                f"step {step} <= last step {last} written to stream {stream!r} by this writer; "
                "write each step once, with all its metrics in one call"
            )
        self._last_step[stream] = int(step)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard:
            self._write_tensorboard(int(step), arrays)
        return record

    def _write_tensorboard(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # On resume, hide the old run's events from this step on, as read_metrics does.
            purge = step if self.resumed else None
            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        for key, arr in arrays.items():
            if arr.ndim == 0:
                self._tb.add_scalar(key, float(arr), step)
            elif arr.ndim == 1:
                for i, v in enumerate(arr):
                    self._tb.add_scalar(f"{key}/layer_{i}", float(v), step)
        self._tb.flush()

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of `run_dir/metrics.jsonl` in file order, resumed-over records removed.

    A truncated last line (crash mid-write, or a writer still running) is skipped; a bad line
    elsewhere raises. Within a stream (see `stream_of`), a record at step s removes the
    stream's earlier records with step >= s: a run resumed from a checkpoint at step s rewrites
    those steps, so this keeps the last record for each (stream, step) and also drops what the
    crashed run logged past its checkpoint.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    lines = path.read_text(encoding="utf-8").split("\n")
    kept: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                log.warning("%s:%d: skipping a partly written last line", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an int 'step'")
        record = {k: _decode(v) for k, v in record.items()}
        stream = kept.setdefault(stream_of(record), [])
        while stream and stream[-1][1]["step"] >= record["step"]:
            stream.pop()
        stream.append((number, record))
    ordered = sorted((pair for stream in kept.values() for pair in stream), key=lambda p: p[0])
    return [record for _, record in ordered]


def max_violation(expert_counts: np.ndarray) -> np.ndarray:
    """MaxVio per layer, max load / mean load - 1, over the last axis: [L, E] -> [L] float64.

    The imbalance metric of Wang et al. 2024 (Auxiliary-Loss-Free Load Balancing): 0 for a
    perfectly balanced layer, E - 1 when one expert takes every token. A layer that routed no
    tokens has no defined load ratio and gives NaN.
    """
    counts = np.asarray(expert_counts, dtype=np.float64)
    if counts.ndim < 1 or counts.shape[-1] == 0:
        raise ValueError(f"expert_counts must have an expert axis last, got shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("expert_counts must be non-negative")
    from train.step import max_violation as on_device  # the formula the train step logs

    return np.asarray(on_device(counts), dtype=np.float64)


@dataclass(frozen=True)
class Throughput:
    """Tokens/s and model FLOPs utilization from a token count and the seconds it took.

    flops_per_token: training FLOPs per token (forward + backward, e.g. 6 * active params plus
      attention). peak_flops: peak FLOP/s of all devices in the run for the dtype in use;
      None (unknown, e.g. on CPU) leaves MFU out.
    """

    flops_per_token: float
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        if not self.flops_per_token > 0:
            raise ValueError(f"flops_per_token must be > 0, got {self.flops_per_token}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"peak_flops must be > 0 or None, got {self.peak_flops}")

    def measure(self, tokens: int, seconds: float) -> dict[str, float]:
        """{'tokens_per_s', 'mfu'} for `tokens` processed in `seconds` (mfu only with peak)."""
        if tokens < 0 or not seconds > 0:
            raise ValueError(f"need tokens >= 0 and seconds > 0, got {tokens} and {seconds}")
        out = {"tokens_per_s": tokens / seconds}
        if self.peak_flops is not None:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / self.peak_flops
        return out
