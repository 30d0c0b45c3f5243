"""GRPO on a mesh: in a child process with 8 forced host devices, the multi-device
equivalence tests of tests/test_grpo_mesh_devices.py (update step, losses and gradients
within 1e-5 of one device; a short train_grpo run on an FSDP mesh)."""

from __future__ import annotations

import pytest

from tests.multidevice import run_on_8_devices


@pytest.mark.slow  # ~5 minutes on 2 cores
def test_grpo_on_8_simulated_devices():
    run_on_8_devices("tests/test_grpo_mesh_devices.py", timeout=1800)
