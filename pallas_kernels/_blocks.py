"""Tile arithmetic and block-size validation shared by the kernels."""

from __future__ import annotations

import dataclasses


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def check_positive_fields(obj) -> None:
    """Every field of a BlockSizes dataclass must be a positive int."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if not isinstance(value, int) or value <= 0:
            name = type(obj).__name__
            raise ValueError(f"{name}.{field.name} must be a positive int, got {value!r}")
