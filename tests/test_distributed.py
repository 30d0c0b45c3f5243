"""Multi-host start-up: argument validation in-process, and a real two-process run (2 CPU
processes x 2 simulated devices, gloo collectives) whose losses equal one device's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from sharding import distributed
from sharding.distributed import DistributedConfig, detected_cluster, initialize

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
# Compiling the step, not running it, is what takes time here: LLVM -O0 halves it, in all three
# processes alike.
FAST_COMPILE = "--xla_backend_optimization_level=0"
ENV_NAMES = (
    distributed.ENV_COORDINATOR,
    distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID,
    distributed.ENV_LOCAL_DEVICE_IDS,
    distributed.ENV_AUTO,
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """A clean environment, and jax.distributed.initialize replaced by a recorder."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="process_id not"):
        DistributedConfig(coordinator="10.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match="coordinator must be 'host:port'"):
        DistributedConfig(coordinator="10.0.0.1", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"port must be in 1\.\.65535"):
        DistributedConfig(coordinator="h:70000", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"process_id must be in 0\.\.1 \(num_processes=2\)"):
        DistributedConfig(coordinator="h:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="num_processes must be a positive int"):
        DistributedConfig(coordinator="h:1234", num_processes=0, process_id=0)
    with pytest.raises(ValueError, match="local_device_ids must be"):
        DistributedConfig(
            coordinator="h:1234", num_processes=1, process_id=0, local_device_ids=[-1]
        )
    with pytest.raises(ValueError, match="local_device_ids set but coordinator"):
        DistributedConfig(local_device_ids=[0])
    # auto=True lets the cluster fill in what is unset.
    assert DistributedConfig(num_processes=4, auto=True).enabled
    assert not DistributedConfig().enabled
    cfg = DistributedConfig("[::1]:1234", 2, 1, local_device_ids=[0, 1])
    assert cfg.local_device_ids == (0, 1)


def test_from_env():
    env = {"JAXSEEK_COORDINATOR": "h:99", "JAXSEEK_NUM_PROCESSES": "2", "JAXSEEK_PROCESS_ID": "1"}
    assert DistributedConfig.from_env(env) == DistributedConfig("h:99", 2, 1)
    assert DistributedConfig.from_env({}) == DistributedConfig()
    assert DistributedConfig.from_env({"JAXSEEK_DISTRIBUTED_AUTO": "1"}).auto
    with pytest.raises(ValueError, match="JAXSEEK_NUM_PROCESSES must be an int, got 'two'"):
        DistributedConfig.from_env({**env, "JAXSEEK_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="JAXSEEK_LOCAL_DEVICE_IDS must be comma-separated"):
        DistributedConfig.from_env({**env, "JAXSEEK_LOCAL_DEVICE_IDS": "0;1"})


def test_nothing_set_is_a_single_process(calls):
    assert initialize() is False
    assert initialize(DistributedConfig()) is False
    assert calls == []


def test_partial_environment_is_an_error(calls, monkeypatch):
    monkeypatch.setenv("JAXSEEK_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("JAXSEEK_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAXSEEK_NUM_PROCESSES not"):
        initialize()
    assert calls == []


def test_explicit_and_auto_arguments(calls, monkeypatch):
    assert initialize(DistributedConfig("127.0.0.1:1234", 2, 1, local_device_ids=[3]))
    assert calls[-1] == dict(
        coordinator_address="127.0.0.1:1234",
        num_processes=2,
        process_id=1,
        local_device_ids=[3],
        cluster_detection_method="deactivate",
    )
    monkeypatch.setenv("JAXSEEK_DISTRIBUTED_AUTO", "1")
    assert initialize()
    assert calls[-1] == {}  # bare: JAX detects the TPU pod / SLURM / MPI cluster
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert initialize(DistributedConfig("127.0.0.1:1234", 2, 0))
    assert len(calls) == 2  # already initialised: a no-op


def test_cluster_launch_is_reported_not_joined(calls, caplog, monkeypatch):
    assert detected_cluster({"SLURM_NTASKS": "4"}) == "slurm: 4 tasks"
    assert detected_cluster({"SLURM_NTASKS": "1"}) is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert initialize() is False
    assert calls == []
    assert "JAXSEEK_DISTRIBUTED_AUTO=1" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(output: str) -> list[float]:
    lines = [line for line in output.splitlines() if line.startswith("LOSSES ")]
    assert len(lines) == 1, output
    return json.loads(lines[0].removeprefix("LOSSES "))


def _run_together(runs: dict[str, tuple[list[str], dict]], logdir: Path, deadline: float):
    """Start every command at once and wait for all, for the first failure, or for the deadline;
    nothing is left running. ({name: exit code, None if killed}, {name: stdout + stderr})."""
    procs, logs = {}, {}
    try:
        for name, (cmd, env) in runs.items():
            logs[name] = open(logdir / f"{name}.log", "w+")  # noqa: SIM115 (closed below)
            procs[name] = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=logs[name], stderr=subprocess.STDOUT, text=True
            )
        # Stop at the first failure: its peer would otherwise wait for it until the deadline.
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs.values()]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        codes = {name: p.poll() for name, p in procs.items()}
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        outputs = {}
        for name, f in logs.items():
            f.seek(0)
            outputs[name] = f.read()
            f.close()
    return codes, outputs


def test_two_processes_equal_one_device(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAXSEEK_")}
    base["JAX_PLATFORMS"] = "cpu"
    # XLA's CPU thread pools hold max(cores, devices) threads; as few as the devices can
    # deadlock a collective (measured with 8 devices: tests/multidevice.py).
    base["PJRT_NPROC"] = "8"
    worker = [sys.executable, "-m", "tests.distributed_worker"]
    port = _free_port()
    pair = {
        f"process {i}": (
            [*worker, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i)],
            {**base, "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=2"},
        )
        for i in range(2)
    }  # fmt: skip
    single = {"single": ([*worker, "--single"], {**base, "XLA_FLAGS": FAST_COMPILE})}
    start = time.monotonic()
    # One after the other: three compiling processes on 2 cores take longer than two rounds.
    codes, outputs = _run_together(single, tmp_path, start + TIMEOUT_S)
    if codes["single"] == 0:
        more_codes, more_outputs = _run_together(pair, tmp_path, start + TIMEOUT_S)
        codes, outputs = {**codes, **more_codes}, {**outputs, **more_outputs}
    elapsed = time.monotonic() - start
    report = "\n".join(
        f"===== {name} (exit {codes[name]}) =====\n{out[-6000:]}" for name, out in outputs.items()
    )
    assert len(codes) == 3 and all(c == 0 for c in codes.values()), (
        f"exit codes {codes} after {elapsed:.0f}s (None: killed at the {TIMEOUT_S}s limit)\n"
        + report
    )
    assert "4 global devices" in outputs["process 1"], report
    two, one = _losses(outputs["process 0"]), _losses(outputs["single"])
    diff = max(abs(a - b) for a, b in zip(two, one, strict=True))
    print(f"2 processes: {two}\n1 device:    {one}\nmax |diff| {diff:.2e} in {elapsed:.1f}s")
    assert len(two) == 3 and diff <= 1e-5, report
