"""Shared fixtures: tiny configs that keep every test fast on 2 CPU cores."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import pytest

from model import MLAConfig, ModelConfig, MoEConfig, YarnConfig

jax.config.update("jax_default_matmul_precision", "highest")

# One XLA compilation cache for the whole suite: every xdist worker, and the 8-device child
# processes (they inherit the environment; XLA_FLAGS are part of the key). The many short runs
# that rebuild the same tiny train step hit it instead of compiling again (test_loop's resume
# test: 120 s -> 62 s). Keyed by the compiled program, jax and flags, so never stale; LRU at 2 GiB.
_XLA_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jaxseek-tests-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"])
)


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


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort): under xdist the few multi-minute tests then start at
    once instead of one of them keeping a worker busy long after the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
