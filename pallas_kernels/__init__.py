"""Pallas kernels beside pure-jnp references (issue 7).

- `fp8`: DeepSeek-V3 fine-grained E4M3 quantization (1x128 tiles, 128x128 blocks).
- `fp8_gemm`: the block-scaled FP8 GEMM kernel, its jnp reference, and `fp8_matmul`.
- `fp8_linear`: an FP8 linear whose custom VJP runs Fprop, Dgrad and Wgrad in FP8 at V3's
  granularity (ModelConfig.fp8 switches it on for the attention and expert projections).
- `sort_by_expert`: the expert-sorted (and tile-padded) row layout every MoE path shares.
- `moe_permute`: group token copies by expert (carrying top-k weights) and combine them back.
- `grouped_gemm`: a matmul over expert-sorted rows, tiles of one expert each.
- `fp8_grouped_gemm`: the same with V3's FP8 Fprop/Dgrad/Wgrad (the PALLAS MoE backend with
  ModelConfig.fp8).
- `moe_permute_tpu`, `grouped_gemm_tpu`: their TPU (Mosaic) builds, chosen on a TPU backend or
  with variant="tpu": scalar-prefetched expert choice and row DMAs (interpret-tested only).
- `ep_dispatch`: token copies packed by destination device, and the expert-parallel
  all-to-all over remote DMA (TPU), the DeepEP idea; `ep_dispatch_ragged` moves only used rows.
"""
