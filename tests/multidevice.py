"""Run a test file in a child pytest process with 8 simulated CPU devices.

The device count is fixed when jax starts, so multi-device tests live in their own files
(skipped when fewer than 8 devices exist) and a parent test runs them here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tail(path: Path, chars: int) -> str:
    text = path.read_text(errors="replace")
    # The stderr of an abort is mostly native stack frames: keep the lines that say what happened.
    lines = [line for line in text.splitlines() if not line.startswith("    @")]
    return "\n".join(lines)[-chars:]


def run_on_8_devices(test_file: str, timeout: int) -> None:
    """Fail with the child's output unless every test of `test_file` passes (none skipped).

    A child that hangs is killed after `timeout` seconds; its output so far (verbose, so it
    names the test that was running) and the Python stacks of every thread, dumped by
    faulthandler once a single test runs past a third of `timeout`, go into the failure.
    """
    # Optimization level 0 halves compile time; both sides of every comparison share it.
    # PJRT_NPROC sizes XLA's CPU thread pools (default: max(cores, devices) = 8 here). With 8
    # threads for 8 devices the child deadlocks in a collective: measured 4 of 4 runs of the
    # sharding tests aborted on a quiet 2-core machine (XLA kills a process whose devices
    # wait 60 s at a rendezvous; CI hung in one), 0 of 5 with 32 threads (the whole file then
    # took 68 s on a quiet machine). A terminate limit of a third of the child's `timeout`
    # keeps a real hang from running to the kill.
    flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             f"--xla_cpu_collective_call_terminate_timeout_seconds={timeout // 3}")  # fmt: skip
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PJRT_NPROC="32")
    cmd = [sys.executable, "-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", f"faulthandler_timeout={timeout // 3}", test_file]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
            try:
                returncode = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                returncode = None
        stdout_text = out.read_text(errors="replace")
        print(stdout_text[-6000:])
        report = stdout_text[-6000:] + "\n--- stderr ---\n" + _tail(err, 6000)
    assert returncode is not None, f"{test_file} hung: killed after {timeout} s\n{report}"
    assert returncode == 0, report
    assert "skipped" not in stdout_text.splitlines()[-1]
