"""hf.load on bad checkpoints and configs: each failure is an error naming the file and field.

No torch needed: the checkpoints are written by `hf.save` and then damaged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import model
from model import MoEConfig, hf
from model.hf_config import HF_DEFAULTS, config_from_hf, config_to_hf
from tests.conftest import tiny_config

CFG = tiny_config()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny checkpoint written by hf.save, in one file and in shards with an index."""
    variables = model.init(CFG, jax.random.key(0))
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    hf.save(CFG, variables, single)
    hf.save(CFG, variables, sharded, max_shard_bytes=20_000)
    return single, sharded


@pytest.fixture
def broken(saved, tmp_path):
    """A writable copy of the single-file checkpoint: (dir, its tensors, its config)."""
    shutil.copytree(saved[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    return tmp_path, load_file(str(tmp_path / "model.safetensors")), config


@pytest.fixture
def sharded(saved, tmp_path):
    shutil.copytree(saved[1], tmp_path, dirs_exist_ok=True)
    return tmp_path


def _write(path, tensors: dict, config: dict):
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))


def test_the_undamaged_checkpoints_load(saved):
    for path in saved:  # tile_rows is a compute choice, not part of the checkpoint
        assert hf.load(path)[0] == CFG.replace(moe=dataclasses.replace(CFG.moe, tile_rows=None))


def test_shape_mismatch_names_the_tensor(broken):
    path, tensors, config = broken
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    rows, cols = tensors[name].shape
    tensors[name] = np.zeros((rows + 4, cols), np.float32)
    _write(path, tensors, config)
    with pytest.raises(ValueError, match=rf"kv_b_proj.*\({rows + 4}, {cols}\).*\({rows}, {cols}\)"):
        hf.load(path)


def test_missing_tensor_is_named(broken):
    path, tensors, config = broken
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    _write(path, tensors, config)
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.mlp\.experts\.3\.up_proj"):
        hf.load(path)


def test_unsupported_config_fails(broken):
    path, _, config = broken
    (path / "config.json").write_text(json.dumps(config | {"scoring_func": "softmax"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*scoring_func"):
        hf.load(path)


def test_missing_files_fail_clearly(broken, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf.load(tmp_path / "nowhere")
    path, _, _ = broken
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        hf.load(path)


@pytest.mark.parametrize(
    ("text", "why"),
    [('{"vocab_size": 97,', "not valid JSON"), ("[1, 2]", "expected a JSON object")],
)
def test_malformed_config_json_names_the_file(broken, text, why):
    path, _, _ = broken
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path / 'config.json'))}: {why}"):
        hf.load(path)


def test_damaged_safetensors_file_is_named(broken):
    path, _, _ = broken
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    file = re.escape(str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{file}: not a readable safetensors file"):
        hf.load(path)


@pytest.mark.parametrize(
    "index",
    [{"metadata": {}}, {"weight_map": ["model.safetensors"]}, {"weight_map": {"a": 3}}],
    ids=["no-weight-map", "list", "bad-file-name"],
)
def test_index_without_a_weight_map_is_a_clear_error(sharded, index):
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    file = re.escape(str(sharded / "model.safetensors.index.json"))
    with pytest.raises(ValueError, match=rf"{file}: needs a 'weight_map' object"):
        hf.load(sharded)


def test_malformed_index_names_the_file(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')
    file = re.escape(str(sharded / "model.safetensors.index.json"))
    with pytest.raises(ValueError, match=rf"{file}: not valid JSON"):
        hf.load(sharded)


def _hf(**changes) -> dict:
    """config.json of a model whose 16 experts allow transformers' default 8 groups; a
    change to `...` drops that key."""
    moe = MoEConfig(16, 1, 2, 16, num_groups=2, top_groups=1)
    out = config_to_hf(CFG.replace(moe=moe)) | changes
    return {k: v for k, v in out.items() if v is not ...}


def test_absent_router_keys_take_transformers_defaults():
    # The router follows what transformers would run from the same config.json.
    cfg = config_from_hf(
        _hf(n_group=..., topk_group=..., routed_scaling_factor=..., norm_topk_prob=...),
        mtp_depth=0,
    )
    assert (cfg.moe.num_groups, cfg.moe.top_groups) == (8, 4)
    assert cfg.moe.routed_scaling_factor == 2.5 and cfg.moe.norm_topk_prob is True
    explicit = config_from_hf(_hf(), mtp_depth=0)
    assert (explicit.moe.num_groups, explicit.moe.top_groups) == (2, 1)
    assert explicit.moe.routed_scaling_factor == 1.0


def test_hf_defaults_are_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    reference = transformers.DeepseekV3Config()
    for key, value in HF_DEFAULTS.items():
        want = reference.rope_parameters["rope_theta"] if key == "rope_theta" else None
        assert value == (want if want is not None else getattr(reference, key)), key


def test_a_default_that_does_not_fit_says_where_it_came_from():
    hf_config = _hf(n_routed_experts=8, n_group=..., topk_group=...)
    with pytest.raises(ValueError, match=r"num_groups \(8\).*omits.*'n_group': 8"):
        config_from_hf(hf_config, mtp_depth=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_group": None}, r"null for field 'n_group' \(omit it for transformers' default 8\)"),
        ({"routed_scaling_factor": None}, "null for field 'routed_scaling_factor'"),
        ({"hidden_size": "32"}, r"hidden_size='32' must be an integer"),
        ({"num_experts_per_tok": 2.5}, r"num_experts_per_tok=2\.5 must be an integer"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob='yes' must be true or false"),
        ({"rms_norm_eps": [1e-6]}, "rms_norm_eps=.* must be a number"),
        ({"vocab_size": ...}, "missing required field 'vocab_size'"),
    ],
)
def test_bad_config_values_name_the_field(broken, changes, message):
    path, _, config = broken
    changed = {k: v for k, v in (config | changes).items() if v is not ...}
    (path / "config.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path / 'config.json'))}: {message}"):
        hf.load(path)


def test_config_forms_agree():
    """DeepSeek's published form (rope_theta + rope_scaling) == transformers' rope_parameters."""
    base = _hf()
    base.pop("rope_scaling")
    base.pop("rope_theta")
    yarn = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32}
    yarn |= {"beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    old = base | {"rope_theta": 5e4, "rope_scaling": {"type": "yarn", **yarn}}
    new = base | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, **yarn}}
    assert config_from_hf(old, mtp_depth=0) == config_from_hf(new, mtp_depth=0)
    assert config_from_hf(old, mtp_depth=0).mla.yarn.factor == 40
    assert config_from_hf(old, mtp_depth=0).mla.rope_theta == 5e4
