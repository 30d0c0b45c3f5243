"""Every Pallas kernel lowers for the accelerators it is written for, checked from a CPU.

`jax.export` with `platforms=["cuda"]` / `["tpu"]` runs the Pallas lowering (Triton for the
generic builds on GPU, Mosaic for the TPU builds) without a device, so shape rules the
interpreter does not enforce fail here: Triton's power-of-two operand shapes (V3's
K = d_model = 7168 is not one), one indexer per load, Mosaic's block constraints. Nothing is
compiled or run; the interpreted tests of each kernel check the values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import fp8_gemm as fp8_gemm_module
from pallas_kernels import fp8_grouped_gemm as fp8_grouped_gemm_module
from pallas_kernels import moe_permute
from pallas_kernels._blocks import generic_compiler_params
from pallas_kernels.fp8 import quantize_blocks, quantize_rows
from pallas_kernels.fp8_gemm import fp8_gemm
from pallas_kernels.fp8_grouped_gemm import fp8_grouped_gemm
from pallas_kernels.fp8_linear import fp8_linear
from pallas_kernels.grouped_gemm import grouped_gemm

TRITON_CALL = "__gpu$xla.gpu.triton"
CUSTOM_CALLS = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call"}

# (rows, K, N, experts): V3's d_model / expert width, and odd sizes (nothing a power of two).
SHAPES = {"v3": (256, 7168, 2048, 8), "odd": (200, 520, 384, 6)}


@pytest.fixture(autouse=True, scope="module")
def _triton_for_gpu():
    # On a GPU backend generic_compiler_params() asks for Triton; from a CPU process it
    # returns None, so select Triton for the cross-platform lowering through the flag.
    before = jax.config.jax_pallas_use_mosaic_gpu
    jax.config.update("jax_pallas_use_mosaic_gpu", False)
    yield
    jax.config.update("jax_pallas_use_mosaic_gpu", before)


def _lower(fn, args, platform: str) -> str:
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


def _operands(shape: str):
    m, k, n, e = SHAPES[shape]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (m, k))
    w = jax.random.normal(keys[1], (k, n))
    w_e = jax.random.normal(keys[2], (e, k, n))
    sizes = jnp.full((e,), m // e, jnp.int32).at[1].set(0).at[0].add(m - (e - 1) * (m // e))
    return x, w, w_e, sizes


def _fp8_gemm(x, w, w_e, sizes, variant):
    a_q, a_s = quantize_rows(x)
    b_q, b_s = quantize_blocks(w)
    return fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=jnp.bfloat16)


def _fp8_linear(x, w, w_e, sizes, variant):
    def loss(x, w):
        return fp8_linear(x, w, use_kernel=True, interpret=False).astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


def _grouped(x, w, w_e, sizes, variant):
    def loss(x, w_e):
        return grouped_gemm(x, w_e, sizes, variant=variant).sum()

    return jax.value_and_grad(loss, argnums=(0, 1))(x, w_e)


def _fp8_grouped(x, w, w_e, sizes, variant):
    def loss(x, w_e):
        return fp8_grouped_gemm(x, w_e, sizes).astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1))(x, w_e)


def _permute_combine(x, w, w_e, sizes, variant):
    num_experts, top_k = w_e.shape[0], 4
    tokens = x[:64]
    experts = jax.random.randint(jax.random.PRNGKey(1), (64, top_k), 0, num_experts)

    def loss(tokens, weights):
        rows, w_m, _, indices = moe_permute.permute(
            tokens, experts, weights, num_experts, variant=variant
        )
        return moe_permute.combine(rows * 2.0, w_m, indices, variant=variant).sum()

    weights = jnp.full((64, top_k), 0.25)
    return jax.value_and_grad(loss, argnums=(0, 1))(tokens, weights)


# name -> (function, the kernel calls the forward + backward lower to at least)
KERNELS = {
    "fp8_gemm": (_fp8_gemm, 1),
    "fp8_linear": (_fp8_linear, 3),
    "grouped_gemm": (_grouped, 3),
    "fp8_grouped_gemm": (_fp8_grouped, 3),
    "permute_combine": (_permute_combine, 3),
}
# The generic builds target GPU (Triton); TPU runs the fp8 GEMMs as they are and the grouped
# GEMM / permute / combine as their TPU builds. The FP8 grouped GEMM has no TPU build.
CASES = [("cuda", name, "generic") for name in KERNELS] + [
    ("tpu", name, "tpu") for name in KERNELS if name != "fp8_grouped_gemm"
]


FP8_KERNELS = ("fp8_gemm", "fp8_linear", "fp8_grouped_gemm")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("platform,name,variant", CASES)
def test_kernel_lowers(platform, name, variant, shape):
    fn, min_calls = KERNELS[name]
    text = _lower(functools.partial(fn, variant=variant), _operands(shape), platform)
    assert text.count(CUSTOM_CALLS[platform]) >= min_calls, (platform, name)


@pytest.mark.parametrize("name", FP8_KERNELS)
def test_fp8_codes_fed_to_the_dot_lower_for_triton(name, monkeypatch):
    # On sm_89+ GPUs (H100/H200) the FP8 kernels give E4M3 codes to the dot instead of
    # upcasting them to bfloat16; from a CPU process that branch is not taken by itself.
    for module in (fp8_gemm_module, fp8_grouped_gemm_module):
        monkeypatch.setattr(module, "_feed_fp8_to_dot", lambda interpret: True)
    jax.clear_caches()  # the jitted wrappers may hold traces of the upcasting branch
    fn, min_calls = KERNELS[name]
    text = _lower(functools.partial(fn, variant="generic"), _operands("v3"), "cuda")
    assert text.count(CUSTOM_CALLS["cuda"]) >= min_calls, name


def test_generic_builds_ask_for_triton_on_gpu(monkeypatch):
    from jax.experimental.pallas import triton as pltriton

    assert generic_compiler_params() is None  # CPU: the interpreter / default lowering
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert isinstance(generic_compiler_params(), pltriton.CompilerParams)
