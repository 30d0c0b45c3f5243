"""Run an experiment: `python -m experiments NAME [--set key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import experiments
from experiments import overrides


def available() -> list[str]:
    """Experiment names (module names with '-' for '_')."""
    skip = {"overrides", "bench"}
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(experiments.__path__)
        if m.name not in skip and not m.name.startswith("_")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("name", nargs="?", help="experiment to run; omit to list them")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)
    if args.name is None:
        print("experiments:", ", ".join(available()))
        return 0
    if args.name not in available():
        parser.error(f"unknown experiment {args.name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"experiments.{args.name.replace('-', '_')}")
    try:
        config = overrides.apply(module.get_config(), args.set)
    except ValueError as err:
        parser.error(str(err))
    print(config)
    if args.print_config:
        return 0
    module.run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
