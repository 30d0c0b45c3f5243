"""Named model configurations: the exact V3, CPU-sized variants, the benchmark configs and the
dense students (model/dense_presets.py)."""

from __future__ import annotations

from collections.abc import Callable

from model.config import MLAConfig, ModelConfig, MoEConfig, YarnConfig
from model.dense_presets import DENSE_PRESETS


def _v3_671b() -> ModelConfig:
    """DeepSeek-V3 as published (PAPER_FACTS.md), YaRN-extended to 128K."""
    return ModelConfig(
        vocab_size=129280,
        d_model=7168,
        num_layers=61,
        num_dense_layers=3,
        dense_dim=18432,
        mla=MLAConfig(
            num_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            rope_theta=10000.0,
            yarn=YarnConfig(factor=40.0, original_max_position=4096, beta_fast=32, beta_slow=1),
        ),
        moe=MoEConfig(
            num_experts=256,
            num_shared_experts=1,
            top_k=8,
            expert_dim=2048,
            num_groups=8,
            top_groups=4,
            routed_scaling_factor=2.5,
        ),
        mtp_depth=1,
        max_seq_len=163840,
        init_std=0.006,
        dtype="bfloat16",
    )


def _v3_tiny() -> ModelConfig:
    """CPU-sized V3 with every feature on: q LoRA, dense first layer, grouped MoE, MTP 1."""
    return ModelConfig(
        vocab_size=2048,
        d_model=128,
        num_layers=4,
        num_dense_layers=1,
        dense_dim=384,
        mla=MLAConfig(
            num_heads=4,
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        ),
        moe=MoEConfig(
            num_experts=16,
            num_shared_experts=1,
            top_k=4,
            expert_dim=64,
            num_groups=4,
            top_groups=2,
            routed_scaling_factor=2.5,
        ),
        mtp_depth=1,
        max_seq_len=512,
        init_std=0.02,
    )


def _v2lite_tiny() -> ModelConfig:
    """The other branches: no q LoRA (as V2-Lite), YaRN on, no dense layer, MTP depth 2."""
    return ModelConfig(
        vocab_size=2048,
        d_model=96,
        num_layers=3,
        num_dense_layers=0,
        dense_dim=256,
        mla=MLAConfig(
            num_heads=3,
            q_lora_rank=None,
            kv_lora_rank=48,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            yarn=YarnConfig(
                factor=4.0, original_max_position=128, mscale=0.707, mscale_all_dim=0.707
            ),
        ),
        moe=MoEConfig(
            num_experts=8,
            num_shared_experts=2,
            top_k=2,
            expert_dim=48,
            routed_scaling_factor=1.0,
        ),
        mtp_depth=2,
        max_seq_len=512,
        init_std=0.02,
    )


def _bench(d: int, heads: int, q_lora: int, kv_lora: int, head: int, experts: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=8192,
        d_model=d,
        num_layers=4,
        num_dense_layers=1,
        dense_dim=2 * d if d == 256 else 3 * d,
        mla=MLAConfig(heads, q_lora, kv_lora, head, head // 2, head),
        moe=MoEConfig(experts, 1, 4, d // 2, num_groups=4, top_groups=2, routed_scaling_factor=2.5),
        mtp_depth=0,
        max_seq_len=512,
    )


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "v3-671b": _v3_671b,
    "v3-tiny": _v3_tiny,
    "v2lite-tiny": _v2lite_tiny,
    # The two side-by-side CPU benchmark configurations of shared/BENCHMARKS.md.
    "bench-small": lambda: _bench(256, 4, 128, 64, 32, 16),
    "bench-d512": lambda: _bench(512, 8, 256, 128, 64, 32),
    **DENSE_PRESETS,  # the R1-Distill bases and the tiny Qwen / Llama students
}


def names() -> list[str]:
    """All preset names."""
    return list(_PRESETS)


def get(name: str) -> ModelConfig:
    """The ModelConfig of a preset; ValueError listing the valid names otherwise."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(_PRESETS)}")
    return _PRESETS[name]()
