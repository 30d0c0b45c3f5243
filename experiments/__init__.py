"""Experiment files: one Python module per experiment, run with `python -m experiments NAME`.

Each experiment module defines `get_config()` returning a frozen dataclass and `run(config)`.
Its docstring gives the command, the expected runtime and the expected result.
"""
