"""Pallas kernels beside pure-jnp references (kernels issue 7).

- `fp8`: DeepSeek-V3 fine-grained E4M3 quantization (1x128 tiles, 128x128 blocks).
- `fp8_gemm`: the block-scaled FP8 GEMM kernel, its jnp reference, and `fp8_matmul`.
MoE dispatch/combine and the FP8 linear layer are still to come.
"""
