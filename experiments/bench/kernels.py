"""Kernel throughput: the FP8 block-scaled GEMM and the MoE grouped GEMM against XLA baselines.

    python -m experiments.bench.kernels [--quick]

Rows (TFLOP/s = 2*m*n*k / seconds; `vs bf16` = bf16 jnp.dot time / this time, same shape,
same run):
  bf16 dot        jnp.dot of bf16 operands, f32 accumulation (the baseline; f32 on CPU,
                  where XLA's bf16 matmul is slow)
  fp8 xla         pallas_kernels.fp8_gemm.fp8_gemm_reference: the same block-scaled math in XLA
  fp8 pallas      pallas_kernels.fp8_gemm.fp8_gemm (accelerators only)
  ragged_dot      jax.lax.ragged_dot over expert-sorted rows (random group sizes; bf16, f32
                  on CPU)
  grouped pallas  pallas_kernels.grouped_gemm.grouped_gemm on the same rows (accelerators only)
  fp8 grp xla     pallas_kernels.fp8_grouped_gemm.fp8_grouped_gemm_fprop_reference: the FP8
                  grouped Fprop (rows per 1x128, experts per 128x128) on given codes, in XLA
  fp8 grp pallas  pallas_kernels.fp8_grouped_gemm.fp8_grouped_gemm_fprop on the same codes
                  (accelerators only)
  fp8 grp +quant  fp8_grouped_gemm's forward including the per-call quantization of the rows
                  and of every expert's weights (accelerators only)

On a GPU or TPU it runs V3's shapes (m = 4096 tokens; (n, k) in (7168, 2048), (2048, 7168),
(18432, 7168), (7168, 18432); 256 experts for the grouped rows, k = 7168, n = 2048); the
targets of issue 7 are >= 1000 TFLOP/s for the FP8 dense GEMM on an H200 (DeepGEMM: ~1350-1550
on H800; its grouped FP8 GEMM ~1100-1300) and the grouped GEMM within 80% of the dense one.
On CPU there is no accelerator: Pallas only runs interpreted there (which measures the
interpreter), so only the XLA rows run, at small shapes, and the script says so.

Expected runtime: ~1 min on the 2-core CPU; a few minutes on an accelerator.
Not yet measured on an accelerator (no GPU was lent when this was written).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8 import quantize_blocks, quantize_rows
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_reference
from pallas_kernels.fp8_grouped_gemm import (
    fp8_grouped_gemm,
    fp8_grouped_gemm_fprop,
    fp8_grouped_gemm_fprop_reference,
    quantize_weights,
)

V3_DENSE = [(4096, 7168, 2048), (4096, 2048, 7168), (4096, 18432, 7168), (4096, 7168, 18432)]
V3_GROUPED = (4096 * 8, 7168, 2048, 256)  # routed rows (tokens x top-8), k, n, experts
CPU_DENSE = [(512, 512, 512), (1024, 1024, 1024)]
CPU_GROUPED = (4096, 512, 256, 32)


def _seconds(fn: Callable, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(name: str, flops: float, seconds: float, baseline: float) -> str:
    return f"  {name:<15}{flops / seconds / 1e12:>10.3f} TFLOP/s{baseline / seconds:>9.2f}x"


def _dtype(accelerator: bool):
    return jnp.bfloat16 if accelerator else jnp.float32


def bench_dense(m: int, n: int, k: int, accelerator: bool, repeats: int) -> list[str]:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (k, n), jnp.float32)
    a16, b16 = a.astype(_dtype(accelerator)), b.astype(_dtype(accelerator))
    a_q, a_s = quantize_rows(a)
    b_q, b_s = quantize_blocks(b)
    flops = 2.0 * m * n * k
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    base = _seconds(dot, a16, b16, repeats=repeats)
    lines = [f"m={m} n={n} k={k}", _row(f"{a16.dtype} dot", flops, base, base)]
    ref = jax.jit(lambda *xs: fp8_gemm_reference(*xs, out_dtype=jnp.bfloat16))
    lines.append(_row("fp8 xla", flops, _seconds(ref, a_q, a_s, b_q, b_s, repeats=repeats), base))
    if accelerator:
        kernel = lambda *xs: fp8_gemm(*xs, out_dtype=jnp.bfloat16)
        t = _seconds(kernel, a_q, a_s, b_q, b_s, repeats=repeats)
        lines.append(_row("fp8 pallas", flops, t, base))
    return lines


def bench_grouped(rows: int, k: int, n: int, experts: int, accelerator: bool, repeats: int):
    rng = np.random.default_rng(0)
    sizes = rng.multinomial(rows, rng.dirichlet(np.ones(experts) * 2.0)).astype(np.int32)
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (rows, k), _dtype(accelerator))
    w = jax.random.normal(kw, (experts, k, n), _dtype(accelerator))
    group_sizes = jnp.asarray(sizes)
    flops = 2.0 * rows * n * k
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    base = _seconds(dot, x, w[0], repeats=repeats)
    ragged = jax.jit(
        lambda x, w, g: jax.lax.ragged_dot(x, w, g, preferred_element_type=jnp.float32)
    )
    lines = [
        f"grouped: {rows} rows, k={k} n={n}, {experts} experts (largest group {sizes.max()}, "
        f"{(sizes == 0).sum()} empty)",
        _row(f"{x.dtype} dot", flops, base, base),
        _row("ragged_dot", flops, _seconds(ragged, x, w, group_sizes, repeats=repeats), base),
    ]
    if accelerator:
        from pallas_kernels.grouped_gemm import grouped_gemm

        kernel = lambda x, w, g: grouped_gemm(x, w, g, out_dtype=jnp.float32)
        t = _seconds(kernel, x, w, group_sizes, repeats=repeats)
        lines.append(_row("grouped pallas", flops, t, base))
    x_q, x_s = quantize_rows(x)
    w_q, w_s = quantize_weights(w)
    codes = (x_q, x_s, w_q, w_s, group_sizes)
    ref = jax.jit(lambda *a: fp8_grouped_gemm_fprop_reference(*a, out_dtype=jnp.bfloat16))
    lines.append(_row("fp8 grp xla", flops, _seconds(ref, *codes, repeats=repeats), base))
    if accelerator:
        t = _seconds(fp8_grouped_gemm_fprop, *codes, repeats=repeats)
        lines.append(_row("fp8 grp pallas", flops, t, base))
        full = lambda x, w, g: fp8_grouped_gemm(x, w, g, out_dtype=jnp.bfloat16)
        t = _seconds(full, x, w, group_sizes, repeats=repeats)
        lines.append(_row("fp8 grp +quant", flops, t, base))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one dense shape, fewer repeats")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    accelerator = backend in ("gpu", "tpu")
    print(f"backend: {backend} ({jax.devices()[0].device_kind})")
    if not accelerator:
        print(
            "no accelerator: Pallas kernels run only interpreted on CPU, so only the XLA "
            "paths are measured, at small shapes"
        )
    dense = V3_DENSE if accelerator else CPU_DENSE
    grouped = V3_GROUPED if accelerator else CPU_GROUPED
    repeats = 3 if args.quick else 10
    for m, n, k in dense[:1] if args.quick else dense:
        print("\n".join(bench_dense(m, n, k, accelerator, repeats)))
    print("\n".join(bench_grouped(*grouped, accelerator=accelerator, repeats=repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
