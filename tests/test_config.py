"""Config validation, presets and parameter counts."""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import pytest

import model
from model import MLAConfig, ModelConfig, MoEConfig, YarnConfig, presets
from tests.conftest import tiny_config
from train.pretrain import to_json


def test_presets_construct_and_are_listed():
    assert {"v3-671b", "v3-tiny", "v2lite-tiny"} <= set(model.presets.names())
    for name in model.presets.names():
        assert isinstance(model.presets.get(name), ModelConfig)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="v3-tiny"):
        model.presets.get("v4")


def test_v3_tiny_has_every_feature_on():
    cfg = model.presets.get("v3-tiny")
    assert cfg.mla.q_lora_rank is not None
    assert 0 < cfg.num_dense_layers < cfg.num_layers
    assert cfg.moe.num_shared_experts >= 1 and cfg.moe.num_groups > 1
    assert cfg.moe.top_groups < cfg.moe.num_groups
    assert cfg.mtp_depth == 1


def test_v2lite_tiny_covers_other_branches():
    cfg = model.presets.get("v2lite-tiny")
    assert cfg.mla.q_lora_rank is None and cfg.mla.yarn is not None and cfg.mtp_depth == 2


def test_count_params_v3_671b_matches_the_paper():
    counts = model.count_params(model.presets.get("v3-671b"))
    assert counts.total == pytest.approx(671e9, rel=0.005)
    assert counts.activated == pytest.approx(36.7e9, rel=0.01)
    assert counts.mtp == pytest.approx(11.5e9, rel=0.02)


def test_count_params_matches_materialized_tiny():
    import jax

    cfg = tiny_config()
    variables = model.init(cfg, jax.random.key(0))
    leaves = jax.tree.leaves(variables["params"])
    counts = model.count_params(cfg)
    assert counts.total + counts.mtp == sum(x.size for x in leaves)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: MLAConfig(0, None, 8, 8, 4, 8), "num_heads"),
        (lambda: MLAConfig(2, -4, 8, 8, 4, 8), "q_lora_rank"),
        (lambda: MLAConfig(2, None, 8, 8, 5, 8), "qk_rope_head_dim"),
        (lambda: MoEConfig(8, 1, 9, 16), "top_k"),
        (lambda: MoEConfig(8, 1, 2, 16, num_groups=3), "num_experts"),
        (lambda: MoEConfig(8, 1, 2, 16, num_groups=4, top_groups=5), "top_groups"),
        (lambda: MoEConfig(8, 1, 6, 16, num_groups=4, top_groups=2), "top_k"),
        (lambda: MoEConfig(8, -1, 2, 16), "num_shared_experts"),
        (lambda: MoEConfig(8, 1, 2, 16, routed_scaling_factor=0.0), "routed_scaling_factor"),
        (lambda: MoEConfig(8, 1, 2, 16, grouped_matmul="ragged"), "grouped_matmul"),
        (lambda: YarnConfig(factor=0.5, original_max_position=16), "factor"),
        (lambda: YarnConfig(4.0, 16, beta_fast=1, beta_slow=32), "beta_fast"),
        (lambda: tiny_config(num_dense_layers=5), "num_dense_layers"),
        (lambda: tiny_config(d_model=-32), "d_model"),
        (lambda: tiny_config(vocab_size=0), "vocab_size"),
        (lambda: tiny_config(dtype="int32"), "dtype"),
        (lambda: tiny_config(moe=None), "moe"),
        (lambda: tiny_config(remat="full"), "remat"),
        (lambda: tiny_config(mtp_depth=-1), "mtp_depth"),
        (lambda: tiny_config(dtype="float8_e4m3fn"), "ModelConfig.dtype"),
        (lambda: tiny_config(dtype=jnp.float8_e5m2), "ModelConfig.dtype"),
        (lambda: tiny_config(param_dtype="float8_e4m3fn"), "ModelConfig.param_dtype"),
        (lambda: tiny_config(dtype="float64"), "ModelConfig.dtype"),
        (lambda: MLAConfig(2, None, 8, 8, 4, 8, rope_theta=1.0), "rope_theta"),
        (lambda: MLAConfig(2, None, 8, 8, 4, 8, rope_theta=0.5), "rope_theta"),
        (lambda: MLAConfig(2, None, 8, 8, 4, 8, rope_theta=math.inf), "rope_theta"),
        (lambda: MLAConfig(2, None, 8, 8, 4, 8, yarn={"factor": 4.0}), "MLAConfig.yarn"),
        (lambda: YarnConfig(factor=math.nan, original_max_position=16), "factor"),
        (lambda: YarnConfig(factor="4", original_max_position=16), "factor"),
        (lambda: YarnConfig(4.0, 0), "original_max_position"),
        (lambda: YarnConfig(4.0, 16.0), "original_max_position"),
        (lambda: YarnConfig(4.0, 16, beta_fast=2.0, beta_slow=-1.0), "beta_slow"),
        (lambda: YarnConfig(4.0, 16, beta_fast=0.0, beta_slow=-1.0), "beta_fast"),
        (lambda: YarnConfig(4.0, 16, mscale=-0.5), r"YarnConfig\.mscale must"),
        (lambda: YarnConfig(4.0, 16, mscale_all_dim=math.nan), "mscale_all_dim"),
    ],
)
def test_invalid_configs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_configs_are_frozen_and_hashable():
    cfg = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64
    assert hash(cfg) == hash(tiny_config())


@pytest.mark.parametrize("name", ["v3-671b", "v3-tiny", "v2lite-tiny"])
def test_model_config_json_round_trip(name):
    cfg = presets.get(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(to_json(cfg)))) == cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", jnp.bfloat16])
def test_compute_dtypes_are_accepted(dtype):
    assert tiny_config(dtype=dtype, param_dtype=dtype).dtype == dtype


def test_yarn_edge_values_are_accepted():
    # factor 1 (no extension) and mscale 0 (no attention scaling) are valid YaRN settings.
    yarn = YarnConfig(1.0, 16, mscale=0.0, mscale_all_dim=0.0)
    assert MLAConfig(2, None, 8, 8, 4, 8, rope_theta=1.5, yarn=yarn).yarn == yarn
