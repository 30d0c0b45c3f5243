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
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist",
           test_file]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout.splitlines()[-1]
