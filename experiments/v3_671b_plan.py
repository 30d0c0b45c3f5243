"""Plan v3-671b training: compile (never run) the train step on simulated clusters and tabulate
per-device memory for several mesh layouts.

    python -m experiments v3-671b-plan [--set devices=64] [--set seq_len=1024]

Each device count is planned in its own child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag only takes effect before jax
initialises its backend). The child builds the TrainState abstractly (`jax.eval_shape`: no
parameter is ever allocated), takes its shardings from `train.sharded_state.state_shardings`,
and lowers and compiles the donated train step for each layout; per-device parameter and
optimizer bytes come from the shardings, temporaries from XLA's `memory_analysis()` (a
layout without it says so in the table, its fits marked "?").

Runtime: about 4 minutes on 2 CPU cores for the six default layouts (25-50 s of lowering and
XLA compilation per layout, about 1.3 GB of host memory); `--set devices=64` plans half of them.
Expected result: every layout compiles and none fits 80 or 141 GB per device. The best is
fsdp 16 x expert 8 on 128 devices: 25 GB parameters + 50 GB AdamW state + 218 GB
temporaries = 293 GB. Parameters and optimizer state alone (float32 master weights and
moments, 12 bytes per parameter) fit at 128 devices once experts and the rest are both split;
with fsdp 1 the 17B non-expert parameters are replicated (111 GB of parameters per device).

The temporaries are those of the CPU lowering (XLA's buffer assignment, e.g. with
--xla_dump_to): the padded all-to-all of model/expert_parallel.py gives every device room
for expert x tokens x top_k rows (7 GiB per float32 buffer at expert 8; 64x the real rows at
expert 64, hence ~1 TB), plain attention keeps float32 scores [heads, 4096, 4096] (8 GiB each),
and under plain FSDP every device gathers each MoE layer's expert weights whole (its token
routing is per device since model.expert_parallel.routed_experts; before, GSPMD sorted the
routed copies of the whole global batch on every device).

Global batch = batch_per_device x devices sequences of seq_len tokens in every layout (the same
tokens per step); under tensor 2 the two tensor devices of a batch shard share its sequences.
Writes plan.json (every row, including XLA's argument/output/alias sizes) and plan.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import model
from model import RematPolicy
from sharding.mesh import ParallelConfig, make_parallel
from sharding.rules import Rules
from train.optimizer import OptimizerConfig, make_optimizer
from train.sharded_state import state_shardings
from train.state import init_state
from train.step import LossConfig, make_train_step

GB = 1e9
BUDGETS_GB = (80, 141)  # H100 / H200 HBM
ROW_PREFIX = "PLAN_ROW "
_REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """One mesh to plan: axis sizes (fsdp None = the devices left over) and the rule preset."""

    devices: int
    fsdp: int | None = None
    expert: int = 1
    tensor: int = 1
    rules: Rules = Rules.FSDP

    def __post_init__(self):
        self.parallel_config().shape(self.devices)  # ValueError if the axes do not fit

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            fsdp=self.fsdp, expert=self.expert, tensor=self.tensor, rules=self.rules
        )

    @property
    def name(self) -> str:
        """E.g. 'fsdp 8 x expert 8 (fsdp_ep)': the axes of size > 1 and the rules."""
        _, fsdp, expert, tensor = self.parallel_config().shape(self.devices)
        sizes = {"fsdp": fsdp, "expert": expert, "tensor": tensor}
        axes = " x ".join(f"{k} {v}" for k, v in sizes.items() if v > 1) or "1 device"
        return f"{axes} ({self.rules.value})"

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"rules": self.rules.value}

    @classmethod
    def from_json(cls, data: dict) -> MeshLayout:
        return cls(**(data | {"rules": Rules(data["rules"])}))


LAYOUTS = (
    # 64 devices: V3 trained with EP 64; 256 experts / 64 = 4 per device.
    MeshLayout(64, fsdp=1, expert=64, rules=Rules.FSDP_EP),
    MeshLayout(64, fsdp=8, expert=8, rules=Rules.FSDP_EP),
    MeshLayout(64, fsdp=64, rules=Rules.FSDP),
    # 128 devices.
    MeshLayout(128, fsdp=2, expert=64, rules=Rules.FSDP_EP),
    MeshLayout(128, fsdp=16, expert=8, rules=Rules.FSDP_EP),
    MeshLayout(128, fsdp=8, expert=8, tensor=2, rules=Rules.FSDP_EP_TP),
)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What to compile: a model preset, the layouts, the per-device batch and remat policy."""

    model: str = "v3-671b"
    layouts: tuple[MeshLayout, ...] = LAYOUTS
    devices: int | None = None  # plan only the layouts of this device count (None: all)
    seq_len: int = 4096
    batch_per_device: int = 1  # global batch = batch_per_device x devices sequences
    remat: RematPolicy = RematPolicy.FULL
    moments_dtype: str = "float32"  # AdamW moments (V3 itself kept them in bfloat16)
    timeout_s: int = 3600  # per child process (one device count)

    def __post_init__(self):
        model.presets.get(self.model)  # fails early, listing the valid names
        for name in ("seq_len", "batch_per_device", "timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PlanConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.remat, RematPolicy):
            raise ValueError(f"PlanConfig.remat must be a RematPolicy, got {self.remat!r}")
        OptimizerConfig(moments_dtype=self.moments_dtype)  # validates the dtype name
        if not self.selected():
            counts = sorted({layout.devices for layout in self.layouts})
            raise ValueError(f"PlanConfig.devices = {self.devices!r}: layouts exist for {counts}")

    def selected(self) -> tuple[MeshLayout, ...]:
        return tuple(x for x in self.layouts if self.devices in (None, x.devices))

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {
            "layouts": [x.to_json() for x in self.layouts],
            "remat": self.remat.value,
        }

    @classmethod
    def from_json(cls, data: dict) -> PlanConfig:
        layouts = tuple(MeshLayout.from_json(x) for x in data["layouts"])
        return cls(**(data | {"layouts": layouts, "remat": RematPolicy(data["remat"])}))


def get_config() -> PlanConfig:
    return PlanConfig()


# ---------------------------------------------------------------------------------------------
# Child side: runs with forced host devices and compiles.


def _per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (abstract leaves) under `shardings`."""
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings)
    if len(leaves) != len(specs):
        raise ValueError(f"{len(leaves)} leaves but {len(specs)} shardings")
    return sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(leaves, specs, strict=True)
    )


def _total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _memory_analysis(compiled) -> tuple[dict, str]:
    """XLA's per-device sizes ({name: bytes}) and a note when there are none."""
    try:
        stats = compiled.memory_analysis()
    except Exception as err:  # not every backend implements it
        return {}, f"memory_analysis failed: {type(err).__name__}: {err}"
    if stats is None:
        return {}, "memory_analysis() is None"
    fields = ("argument", "output", "alias", "temp", "generated_code")
    found = {}
    for field in fields:
        value = getattr(stats, f"{field}_size_in_bytes", None)
        if value is not None:
            found[field] = int(value)
    return found, "" if "temp" in found else "no temp size from memory_analysis()"


def abstract_batch(global_batch: int, seq_len: int, sharding) -> dict:
    """ShapeDtypeStructs of the train step's batch contract (train/packing.py)."""
    shape = (global_batch, seq_len)
    ints = ("inputs", "targets", "segment_ids", "positions")
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in ints}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return batch


def plan_layout(config: PlanConfig, layout: MeshLayout) -> dict:
    """Compile the train step under `layout` on the first `layout.devices` devices; one row."""
    cfg = model.presets.get(config.model).replace(remat=config.remat)
    opt_cfg = OptimizerConfig(moments_dtype=config.moments_dtype)
    optimizer = make_optimizer(opt_cfg)
    parallel = make_parallel(layout.parallel_config(), jax.devices()[: layout.devices])
    cfg = parallel.configure(cfg)
    row = {"devices": layout.devices, "layout": layout.name, "rules": layout.rules.value}

    shardings = state_shardings(cfg, optimizer, parallel)
    shapes = jax.eval_shape(functools.partial(init_state, cfg, optimizer), jax.random.key(0))
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    batch_sharding = parallel.batch_sharding()
    batch = abstract_batch(layout.devices * config.batch_per_device, config.seq_len, batch_sharding)
    params = _per_device_bytes(shapes.params, shardings.params)
    opt_state = _per_device_bytes(shapes.opt_state, shardings.opt_state)
    everything = _per_device_bytes(shapes, shardings) + _per_device_bytes(
        batch, jax.tree.map(lambda _: batch_sharding, batch)
    )
    row |= {
        "params_bytes": params,
        "opt_state_bytes": opt_state,
        "other_bytes": everything - params - opt_state,  # router bias, step, rng, batch
        "params_bytes_total": _total_bytes(shapes.params),
    }

    step = make_train_step(cfg, LossConfig(), optimizer, opt_cfg.schedule)
    start = time.perf_counter()
    with parallel.activate():
        jitted = jax.jit(
            step,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, parallel.replicated()),
            donate_argnums=0,
        )
        lowered = jitted.lower(state, batch)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
    row |= {"lower_s": round(lower_s, 1), "compile_s": round(time.perf_counter() - start, 1)}

    xla, note = _memory_analysis(compiled)
    row |= {f"xla_{k}_bytes": v for k, v in xla.items()}
    row["temp_bytes"] = xla.get("temp")
    row["total_bytes"] = everything + (xla.get("temp") or 0)
    row["note"] = note
    return row


def _child_main(config: PlanConfig, num_devices: int) -> None:
    if jax.device_count() < num_devices:
        raise RuntimeError(
            f"{jax.device_count()} devices, need {num_devices}: is XLA_FLAGS set before jax?"
        )
    for layout in config.selected():
        if layout.devices != num_devices:
            continue
        try:
            row = plan_layout(config, layout)
        except Exception as err:  # a layout that fails to compile is a row, not the end
            message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            row = {"devices": layout.devices, "layout": layout.name, "error": message}
        print(ROW_PREFIX + json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side: one child per device count, the table, plan.json / plan.md.


def plan_devices(config: PlanConfig, num_devices: int) -> list[dict]:
    """Rows of every selected layout with `num_devices` devices, compiled in a child process."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    env = os.environ | {"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    command = [
        sys.executable,
        "-m",
        "experiments.v3_671b_plan",
        "--child",
        json.dumps(config.to_json()),
        "--devices",
        str(num_devices),
    ]
    try:
        proc = subprocess.run(
            command,
            env=env,
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=config.timeout_s,
            check=False,
        )
        stdout, failure = (
            proc.stdout,
            (
                f"child exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
                if proc.returncode
                else ""
            ),
        )
    except subprocess.TimeoutExpired as err:  # run() has killed and reaped the child
        out = err.stdout or ""
        stdout = out.decode() if isinstance(out, bytes) else out
        failure = f"child timed out after {config.timeout_s} s"
    rows = [
        json.loads(line[len(ROW_PREFIX) :])
        for line in stdout.splitlines()
        if line.startswith(ROW_PREFIX)
    ]
    done = {row["layout"] for row in rows}
    for layout in config.selected():
        if layout.devices == num_devices and layout.name not in done:
            rows.append({"devices": num_devices, "layout": layout.name, "error": failure})
    return rows


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GB:.1f}"


def table(rows: list[dict]) -> str:
    """A markdown table of the rows (GB = 1e9 bytes, per device)."""
    head = [
        "devices",
        "layout",
        "params GB",
        "optimizer GB",
        "temporaries GB",
        "total GB",
        *(f"fits {b} GB" for b in BUDGETS_GB),
        "compile s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in rows:
        if "error" in row:
            cells = [str(row["devices"]), row["layout"], *["-"] * (len(head) - 3), "failed"]
            notes.append(f"{row['devices']} devices, {row['layout']}: {row['error']}")
        else:
            known = row["temp_bytes"] is not None
            fits = [
                ("yes" if row["total_bytes"] <= b * GB else "no") + ("" if known else "?")
                for b in BUDGETS_GB
            ]
            cells = [
                str(row["devices"]),
                row["layout"],
                _gb(row["params_bytes"]),
                _gb(row["opt_state_bytes"]),
                _gb(row["temp_bytes"]),
                _gb(row["total_bytes"]),
                *fits,
                f"{row['compile_s']:.0f}",
            ]
            if row.get("note"):
                notes.append(f"{row['devices']} devices, {row['layout']}: {row['note']}")
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines)


def run(config: PlanConfig, run_dir) -> dict:
    """Plan every selected layout, print the table, write plan.json and plan.md."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for num_devices in sorted({x.devices for x in config.selected()}):
        print(f"compiling {config.model} on {num_devices} host devices ...", flush=True)
        for row in plan_devices(config, num_devices):
            print("  " + json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows)
    print("\n" + text)
    (run_dir / "plan.json").write_text(
        json.dumps({"config": config.to_json(), "rows": rows}, indent=2)
    )
    (run_dir / "plan.md").write_text(text + "\n")
    ok = [r for r in rows if "error" not in r]
    return {
        "layouts": len(rows),
        "failed": len(rows) - len(ok),
        "fit_80GB": sum(r["total_bytes"] <= 80 * GB for r in ok),
        "fit_141GB": sum(r["total_bytes"] <= 141 * GB for r in ok),
        "max_compile_s": max((r["compile_s"] for r in ok), default=0.0),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child process of the v3-671b-plan experiment")
    parser.add_argument("--child", required=True, help="the PlanConfig as JSON")
    parser.add_argument("--devices", type=int, required=True)
    args = parser.parse_args()
    _child_main(PlanConfig.from_json(json.loads(args.child)), args.devices)
