"""Tile arithmetic, block-size validation and the kernel-variant choice shared by the kernels."""

from __future__ import annotations

import dataclasses

import jax


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


VARIANTS = ("auto", "generic", "tpu")


def kernel_variant(variant: str) -> str:
    """Which build of a kernel to run: "generic" (blocks picked inside the kernel: GPU and
    interpret mode), "tpu" (Mosaic TPU: scalar prefetch and DMAs), or "auto", which is "tpu"
    on a TPU backend and "generic" elsewhere."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "auto":
        return "tpu" if jax.default_backend() == "tpu" else "generic"
    return variant


def generic_compiler_params():
    """Compiler params of the generic builds: Triton on a GPU backend, None elsewhere.

    The generic kernels are written for Triton's model (independent programs, blocks picked
    inside the kernel, power-of-two array shapes). jax >= 0.10 lowers a GPU pallas_call
    without compiler params through Mosaic GPU, which rejects them (e.g. a 16-byte stride
    rule on small scale arrays), so on GPU they ask for Triton explicitly; on TPU and in
    interpret mode the default applies (Triton params cannot lower for TPU)."""
    if jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams()
    return None
