"""Run a test file in a child pytest process with 8 simulated CPU devices.

The device count is fixed when jax starts, so multi-device tests live in their own files
(skipped when fewer than 8 devices exist) and a parent test runs them here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_8_devices(test_file: str, timeout: int) -> None:
    """Fail with the child's output unless every test of `test_file` passes (none skipped)."""
    # Optimization level 0 halves compile time; both sides of every comparison share it.
    # The 8 device threads share 2 cores with the other test worker, so one device can reach a
    # collective long after the rest; XLA aborts the process when one is 60 s late (20 s warn +
    # 40 s terminate, measured; CI hit it in an all-reduce). The terminate limit is raised to the
    # child's own `timeout`, which still catches a real hang.
    flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             f"--xla_cpu_collective_call_terminate_timeout_seconds={timeout}")  # fmt: skip
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", "-p", "no:xdist",
           test_file]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-6000:])
    # The stderr of an abort is mostly native stack frames: keep the lines that say what happened.
    errors = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("    @"))
    assert result.returncode == 0, result.stdout[-6000:] + errors[-3000:]
    assert "skipped" not in result.stdout.splitlines()[-1]
