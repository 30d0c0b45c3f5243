"""Shared fixtures: tiny configs that keep every test fast on 2 CPU cores."""

from __future__ import annotations

import jax
import pytest

from model import MLAConfig, ModelConfig, MoEConfig, YarnConfig

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(**changes) -> ModelConfig:
    """A very small V3: q LoRA, 1 dense + 2 MoE layers, group-limited routing, MTP depth 1."""
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        num_layers=3,
        num_dense_layers=1,
        dense_dim=48,
        mla=MLAConfig(
            num_heads=2,
            q_lora_rank=16,
            kv_lora_rank=12,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
        ),
        moe=MoEConfig(
            num_experts=8,
            num_shared_experts=1,
            top_k=2,
            expert_dim=16,
            num_groups=4,
            top_groups=2,
            routed_scaling_factor=2.5,
            tile_rows=8,
        ),
        mtp_depth=1,
        max_seq_len=64,
        init_std=0.2,
    )
    return cfg.replace(**changes)


def tiny_yarn_config(**changes) -> ModelConfig:
    """No q LoRA, YaRN on, no dense layer, MTP depth 2."""
    base = tiny_config()
    mla = MLAConfig(
        num_heads=2,
        q_lora_rank=None,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=6,
        yarn=YarnConfig(factor=4.0, original_max_position=16),
    )
    return base.replace(mla=mla, num_dense_layers=0, mtp_depth=2, **changes)


@pytest.fixture(params=["v3", "yarn"], ids=["qlora-dense-mtp1", "noqlora-yarn-mtp2"])
def cfg(request) -> ModelConfig:
    return tiny_config() if request.param == "v3" else tiny_yarn_config()
