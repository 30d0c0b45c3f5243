"""Metrics writer/reader: JSONL round trip, resume, crash tolerance, TensorBoard, MaxVio, MFU."""

from __future__ import annotations

import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from train.metrics import MetricsWriter, Throughput, max_violation, read_metrics


def _strict_json_lines(path) -> list[dict]:
    """Parse every line as strict JSON (bare NaN/Infinity tokens rejected)."""

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_round_trip_scalars_arrays_and_non_finite(tmp_path):
    load = np.array([[3, 1, 0, 4], [2, 2, 2, 2]], dtype=np.int32)
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(
            7,
            {
                "ce": np.float32(2.5),
                "mtp_loss": jnp.asarray(3.0, jnp.bfloat16),
                "tokens": 4096,
                "grad_norm": float("nan"),
                "balance_loss": -np.inf,
                "maxvio": np.array([0.5, np.inf, np.nan]),
                "expert_load": load,
            },
        )
        writer.write(7, {"ce": 2.75}, prefix="eval/")
    raw = _strict_json_lines(tmp_path / "metrics.jsonl")
    assert raw[0]["grad_norm"] == "NaN" and raw[0]["maxvio"] == [0.5, "Infinity", "NaN"]
    assert raw[0]["balance_loss"] == "-Infinity"
    assert raw[1] == {"step": 7, "eval/ce": 2.75}

    train, evals = read_metrics(tmp_path)
    assert train["ce"] == 2.5 and type(train["ce"]) is float
    assert train["mtp_loss"] == 3.0 and type(train["mtp_loss"]) is float
    assert train["tokens"] == 4096 and type(train["tokens"]) is int
    assert math.isnan(train["grad_norm"]) and train["balance_loss"] == -math.inf
    assert train["maxvio"][:2] == [0.5, math.inf] and math.isnan(train["maxvio"][2])
    assert train["expert_load"] == load.tolist()
    assert evals == {"step": 7, "eval/ce": 2.75}


def test_resume_appends_and_later_records_supersede(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as first:
        for step in range(7):  # crashed after step 6; last checkpoint at step 2
            first.write(step, {"loss": 10.0 - step})
            if step % 2 == 0:
                first.write(step, {"loss": 20.0 - step}, prefix="eval/")
    with MetricsWriter(tmp_path, tensorboard=False) as resumed:
        assert resumed.resumed
        for step in range(3, 6):
            resumed.write(step, {"loss": 100.0 + step})
            if step % 2 == 0:
                resumed.write(step, {"loss": 200.0 + step}, prefix="eval/")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 11 + 4

    records = read_metrics(tmp_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    # The crashed run's steps 3-6 are replaced, including step 6 the new run hasn't reached.
    assert train == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 103.0), (4, 104.0), (5, 105.0)]
    assert evals == [(0, 20.0), (2, 18.0), (4, 204.0)]


def test_truncated_last_line_is_skipped_then_cut_on_resume(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(3):
            writer.write(step, {"loss": float(step), "maxvio": [0.1, 0.2]})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 3, "loss": 3.0, "maxvio": [0.1, 0.')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]

    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(3, {"loss": 3.5})
    assert [r["step"] for r in _strict_json_lines(path)] == [0, 1, 2, 3]
    assert read_metrics(tmp_path)[-1] == {"step": 3, "loss": 3.5}


def test_corrupt_line_inside_the_file_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1}\n{"step": 1, "lo\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


@pytest.mark.parametrize(
    ("step", "metrics", "prefix", "error"),
    [
        (2, {"loss": 1.0}, "", "step 2 <= last step 2"),  # step 2 already written below
        (3, {"loss": 1.0}, "eval", "prefix"),
        (-1, {"loss": 1.0}, "", "non-negative"),
        (3, {"step": 1.0}, "", "other than 'step'"),
        (3, {"name": "text"}, "", "'name'"),
        (3, {"weights": np.zeros((300, 300))}, "", "MAX_ARRAY_SIZE"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, step, metrics, prefix, error):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(2, {"loss": 0.5})
        with pytest.raises((ValueError, TypeError), match=error):
            writer.write(step, metrics, prefix=prefix)
    assert len(read_metrics(tmp_path)) == 1  # nothing half-written


def _event_tags(run_dir) -> set[str]:
    """Scalar tags in the TFRecord event files (u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            pos += 12 + length + 4
    return tags


def test_tensorboard_gets_scalars_and_per_layer_values(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 2.0, "maxvio": [0.1, 0.3], "expert_load": np.ones((2, 4))})
        writer.write(1, {"ce": 2.1}, prefix="eval/")
    assert _event_tags(tmp_path) == {"loss", "maxvio/layer_0", "maxvio/layer_1", "eval/ce"}


def test_max_violation_hand_example():
    counts = np.array([[1, 1, 1, 1], [4, 0, 0, 0], [3, 1, 1, 1]])
    np.testing.assert_allclose(max_violation(counts), [0.0, 3.0, 1.0])
    assert np.isnan(max_violation(np.zeros((1, 4)))[0])  # a layer that routed nothing
    with pytest.raises(ValueError, match="non-negative"):
        max_violation(np.array([[1, -1]]))


def test_throughput_and_mfu():
    meter = Throughput(flops_per_token=6e9, peak_flops=1e13)
    assert meter.measure(tokens=1000, seconds=2.0) == pytest.approx(
        {"tokens_per_s": 500.0, "mfu": 0.3}
    )
    assert Throughput(flops_per_token=6e9).measure(10, 5.0) == {"tokens_per_s": 2.0}
    with pytest.raises(ValueError, match="flops_per_token"):
        Throughput(flops_per_token=0)
