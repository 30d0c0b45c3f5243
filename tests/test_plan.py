"""The v3-671b-plan experiment on v3-tiny: 8 forced host devices in a child process (XLA_FLAGS
must be set before jax starts, and this process has started it), the same code path as the
671B plan."""

from __future__ import annotations

import json

import pytest

from experiments import v3_671b_plan as plan
from sharding.rules import Rules

FSDP8 = plan.MeshLayout(8, rules=Rules.FSDP)
EP4 = plan.MeshLayout(8, fsdp=2, expert=4, rules=Rules.FSDP_EP)
TINY = plan.PlanConfig(model="v3-tiny", layouts=(FSDP8, EP4), seq_len=32, timeout_s=300)


def test_layout_names_and_validation():
    assert FSDP8.name == "fsdp 8 (fsdp)"
    assert plan.LAYOUTS[1].name == "fsdp 8 x expert 8 (fsdp_ep)"
    assert plan.LAYOUTS[-1].name == "fsdp 8 x expert 8 x tensor 2 (fsdp_ep_tp)"
    with pytest.raises(ValueError, match="does not fit 64 devices"):
        plan.MeshLayout(64, fsdp=3, expert=8)
    with pytest.raises(ValueError, match="layouts exist for"):
        plan.PlanConfig(devices=32)
    assert plan.PlanConfig.from_json(json.loads(json.dumps(TINY.to_json()))) == TINY


def test_plan_tiny_on_8_devices(tmp_path):
    summary = plan.run(TINY, tmp_path)
    assert summary["layouts"] == 2 and summary["failed"] == 0, summary

    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    assert [r["layout"] for r in rows] == [FSDP8.name, EP4.name]
    for row in rows:
        assert "error" not in row, row
        assert row["compile_s"] > 0
        state = row["params_bytes"] + row["opt_state_bytes"] + row["other_bytes"]
        if "xla_argument_bytes" in row:  # the shardings' arithmetic is what XLA allocates
            # (but for the batch's segment_ids, unused without document masking)
            assert state == pytest.approx(row["xla_argument_bytes"], rel=1e-3)
        if row["temp_bytes"] is not None:
            assert row["total_bytes"] == state + row["temp_bytes"]
    fsdp = rows[0]
    assert fsdp["params_bytes"] == pytest.approx(fsdp["params_bytes_total"] / 8, rel=0.1)
    # AdamW: two float32 moments per parameter (+ a few scalars).
    assert fsdp["opt_state_bytes"] == pytest.approx(2 * fsdp["params_bytes"], rel=0.01)

    lines = (tmp_path / "plan.md").read_text().splitlines()
    assert lines[0].startswith("| devices | layout | params GB")
    assert [line.split(" | ")[1] for line in lines[2:4]] == [FSDP8.name, EP4.name]
