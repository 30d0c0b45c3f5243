"""Pallas kernels (FP8 GEMM, MoE dispatch/combine) beside pure-jnp references (kernels issue)."""
