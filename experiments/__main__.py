"""Run an experiment: `python -m experiments NAME_OR_PATH [--run-dir DIR] [--set k=v] [--sweep]`.

NAME is a module in experiments/ ('-' or '_'), PATH a Python file anywhere. An experiment
defines `get_config()` (a frozen dataclass), `run(config, run_dir) -> dict` (a summary of
scalars) and, for sweeps, `get_sweep() -> dict[str, list[str]]` mapping a variant name to its
`--set`-style overrides, plus optionally `after_sweep(run_dir, summaries)` (e.g. a comparison
plot). A command (e.g. `generate`) instead defines `main(argv) -> int` and parses its own
arguments: `python -m experiments generate --ckpt runs/pretrain-tiny --prompt "..."`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys
import time
from pathlib import Path
from types import ModuleType

import experiments
from experiments import overrides
from train.checkpoint import IncompatibleCheckpointError
from train.loop import Interrupted
from train.run_dir import ConfigMismatchError

_NOT_EXPERIMENTS = {"overrides", "bench", "common", "stages"}


def available() -> list[str]:
    """Experiment names (module names with '-' for '_')."""
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(experiments.__path__)
        if m.name not in _NOT_EXPERIMENTS and not m.name.startswith("_")
    )


def load(name_or_path: str) -> ModuleType:
    """The experiment module for a name in experiments/ or a path to a .py file."""
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise ValueError(f"experiment file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if name_or_path.replace("_", "-") not in available():
            raise ValueError(
                f"unknown experiment {name_or_path!r}; available: {', '.join(available())}"
            )
        module = importlib.import_module(f"experiments.{name_or_path.replace('-', '_')}")
    if hasattr(module, "main"):
        return module
    for attr in ("get_config", "run"):
        if not hasattr(module, attr):
            raise ValueError(f"experiment {name_or_path} has no {attr}()")
    return module


def _table(rows: dict[str, dict]) -> str:
    keys = sorted({k for row in rows.values() for k in row if not isinstance(row[k], dict)})
    width = max(len(n) for n in rows) + 2
    widths = {k: max(len(k), 10) + 2 for k in keys}
    lines = ["variant".ljust(width) + "".join(k.rjust(widths[k]) for k in keys)]
    for name, row in rows.items():
        cells = []
        for k in keys:
            v = row.get(k, "")
            cells.append((f"{v:.4g}" if isinstance(v, float) else str(v)).rjust(widths[k]))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-"):
        try:
            module = load(argv[0])
        except ValueError:
            module = None  # reported by the parser below
        if hasattr(module, "main"):
            return module.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("name", nargs="?", help="experiment name or .py path; omit to list")
    parser.add_argument("--run-dir", type=Path, help="output folder (default: runs/NAME)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    parser.add_argument("--sweep", action="store_true", help="run every get_sweep() variant")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)
    if args.name is None:
        print("experiments:", ", ".join(available()))
        return 0
    try:
        module = load(args.name)
        config = overrides.apply(module.get_config(), args.set)
        variants = {"": config}
        if args.sweep:
            if not hasattr(module, "get_sweep"):
                raise ValueError(f"experiment {args.name} has no get_sweep()")
            variants = {
                name: overrides.apply(config, sets) for name, sets in module.get_sweep().items()
            }
    except ValueError as err:
        parser.error(str(err))
    run_dir = args.run_dir or Path("runs") / Path(args.name).stem.replace("_", "-")
    if args.print_config:
        for name, cfg in variants.items():
            print(name or args.name, cfg)
        return 0
    summaries = {}
    for name, cfg in variants.items():
        target = run_dir / name if name else run_dir
        print(f"== {args.name} {name} -> {target}\n{cfg}", flush=True)
        start = time.perf_counter()
        try:
            summary = dict(module.run(cfg, target) or {})
        except (ConfigMismatchError, IncompatibleCheckpointError) as err:
            # The run dir is left as it was: say why and how to proceed, no traceback.
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        except Interrupted as err:  # a stage stopped on a signal: later stages did not run
            parser.exit(130, f"{parser.prog}: stopped: {err}\n")
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        summaries[name or args.name] = summary
    print("\n" + _table(summaries))
    if args.sweep and hasattr(module, "after_sweep"):
        module.after_sweep(run_dir, summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
