"""Hugging Face checkpoint I/O: logit parity with transformers' DeepseekV3ForCausalLM (float32,
eager attention), exact save/load round trips, MTP tensors, FP8 block dequantization, and clear
errors on bad checkpoints. Needs the `parity` extra (torch, transformers)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import model
from model import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.parity
B, T = 2, 16
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
_YARN |= {"original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0}
CONFIGS = {
    # group-limited routing (4 groups, keep 2), q LoRA, 1 dense + 2 MoE layers, no YaRN
    "groups-qlora-dense1": {"n_group": 4, "topk_group": 2},
    # YaRN (mscale = mscale_all_dim = 1, as V3), no q LoRA, every layer MoE, top-3
    "yarn-noqlora-moe-only": {
        "rope_parameters": _YARN | {"mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 32,  # = factor * original, as YaRN configs state it
        "q_lora_rank": None,
        "first_k_dense_replace": 0,
        "num_hidden_layers": 2,
        "num_experts_per_tok": 3,
    },
    # YaRN with mscale 0.707 (V2-Lite style), 2 dense + 1 MoE, 2 shared experts, no top-k norm
    "yarn-dense2-shared2": {
        "rope_parameters": _YARN | {"mscale": 0.707, "mscale_all_dim": 0.707},
        "max_position_embeddings": 32,
        "first_k_dense_replace": 2,
        "n_shared_experts": 2,
        "n_group": 2,
        "topk_group": 1,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.5,
    },
}


def _hf_config(**changes) -> transformers.DeepseekV3Config:
    kw = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        first_k_dense_replace=1, max_position_embeddings=64, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    return transformers.DeepseekV3Config(**(kw | changes))


def _random_hf_model(config, seed: int = 0):
    """Weights ~ N(0, 1/fan_in) so attention and routing are far from uniform; norms near 1."""
    torch.manual_seed(seed)
    m = transformers.DeepseekV3ForCausalLM(config).float().eval()
    m.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return m


def _tokens(vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def _torch_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(input_ids=torch.as_tensor(tokens)).logits.numpy()


def _jax_logits(cfg, variables, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model.forward(cfg, variables, jnp.asarray(tokens)).logits)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write(path, tensors: dict, config: dict, shards: int = 1):
    """A checkpoint dir with these tensors (split into `shards` files plus an index)."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(path / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (dir written by transformers' save_pretrained, the torch model)."""
    out = {}
    for i, (name, changes) in enumerate(CONFIGS.items()):
        m = _random_hf_model(_hf_config(**changes), seed=i)
        path = tmp_path_factory.mktemp(name)
        m.save_pretrained(path)
        out[name] = (path, m)
    return out


@pytest.fixture(scope="module")
def mtp_checkpoint(checkpoints, tmp_path_factory):
    """The first checkpoint plus one MTP module under DeepSeek's names, in 2 shards.

    transformers 5.24 neither builds nor saves MTP modules, so they are written by hand: the
    block is a perturbed copy of the last MoE layer, renamed to layer num_hidden_layers."""
    src, _ = checkpoints["groups-qlora-dense1"]
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    n, d = config["num_hidden_layers"], config["hidden_size"]
    rng = np.random.default_rng(7)
    mtp = {}
    for name, x in tensors.items():
        if name.startswith(f"model.layers.{n - 1}."):
            mtp[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = (
                x + 0.05 * rng.standard_normal(x.shape)
            ).astype(np.float32)
    pre = f"model.layers.{n}."
    mtp[pre + "enorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    mtp[pre + "hnorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    mtp[pre + "eh_proj.weight"] = (rng.standard_normal((d, 2 * d)) / 8).astype(np.float32)
    mtp[pre + "shared_head.norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    mtp[pre + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    mtp[pre + "shared_head.head.weight"] = tensors["lm_head.weight"]
    path = tmp_path_factory.mktemp("mtp")
    _write(path, tensors | mtp, config | {"num_nextn_predict_layers": 1}, shards=2)
    return path, mtp


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    path, m = checkpoints[name]
    cfg, variables = hf.load(path)
    assert cfg.mtp_depth == 0  # transformers declares num_nextn_predict_layers=1 but saves none
    tokens = _tokens(cfg.vocab_size)
    want = _torch_logits(m, tokens)
    got = _jax_logits(cfg, variables, tokens)
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |jax - torch| logits = {diff:.3g} (logit scale {np.abs(want).max():.3g})")
    assert diff < 1e-4


@pytest.mark.parametrize("name", ["groups-qlora-dense1", "yarn-noqlora-moe-only"])
def test_greedy_generation_matches_transformers(checkpoints, name):
    """Cached absorbed decode against HF generate (which caches per-head K/V), token for token."""
    path, m = checkpoints[name]
    cfg, variables = hf.load(path)
    prompts = _tokens(cfg.vocab_size, seed=3)[:, :8]
    with torch.no_grad():
        want = m.generate(
            torch.as_tensor(prompts), max_new_tokens=10, do_sample=False, min_new_tokens=10
        )[:, prompts.shape[1] :].numpy()
    got = model.generate(cfg, variables, prompts.tolist(), max_new_tokens=10, temperature=0)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)


@pytest.mark.parametrize("max_shard_bytes", [5e9, 20_000], ids=["single", "sharded"])
def test_save_load_round_trip_is_exact(mtp_checkpoint, tmp_path, max_shard_bytes):
    cfg, variables = hf.load(mtp_checkpoint[0])
    hf.save(cfg, variables, tmp_path, max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes < 1e6), shards
    cfg2, variables2 = hf.load(tmp_path)
    assert cfg2 == cfg and cfg.mtp_depth == 1
    _assert_trees_equal(variables, variables2)


def test_failed_save_keeps_the_previous_checkpoint(mtp_checkpoint, tmp_path, monkeypatch):
    cfg, variables = hf.load(mtp_checkpoint[0])
    hf.save(cfg, variables, tmp_path, max_shard_bytes=20_000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 1:
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        hf.save(cfg, variables, tmp_path)  # single-file layout would replace the shards
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saving-")]


def test_transformers_loads_what_save_writes(checkpoints, mtp_checkpoint, tmp_path):
    # YaRN exercises the rope_scaling form of config.json; the MTP tensors must be ignored.
    path, m = checkpoints["yarn-noqlora-moe-only"]
    cfg, variables = hf.load(path)
    hf.save(cfg, variables, tmp_path / "yarn", max_shard_bytes=50_000)
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "yarn", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert loaded.config.rope_parameters["rope_type"] == "yarn"
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_array_equal(_torch_logits(loaded, tokens), _torch_logits(m, tokens))

    cfg, variables = hf.load(mtp_checkpoint[0])
    hf.save(cfg, variables, tmp_path / "mtp")
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "mtp", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    _, m = checkpoints["groups-qlora-dense1"]
    np.testing.assert_array_equal(_torch_logits(loaded, tokens), _torch_logits(m, tokens))


def test_mtp_tensors_load(mtp_checkpoint):
    path, written = mtp_checkpoint
    cfg, variables = hf.load(path)
    assert cfg.mtp_depth == 1 and cfg.mtp_uses_moe
    mtp, pre = variables["params"]["mtp"], f"model.layers.{cfg.num_layers}."
    np.testing.assert_array_equal(mtp["enorm"]["scale"][0], written[pre + "enorm.weight"])
    np.testing.assert_array_equal(mtp["hnorm"]["scale"][0], written[pre + "hnorm.weight"])
    np.testing.assert_array_equal(mtp["eh_proj"]["kernel"][0], written[pre + "eh_proj.weight"].T)
    want = written[pre + "shared_head.norm.weight"]
    np.testing.assert_array_equal(mtp["final_norm"]["scale"][0], want)
    want = written[pre + "mlp.experts.5.down_proj.weight"].T
    np.testing.assert_array_equal(mtp["block"]["moe"]["experts"]["wo"][0, 5], want)
    bias = variables["router_bias"]["mtp"]["block"]["moe"]["router"]["bias"][0]
    np.testing.assert_array_equal(bias, written[pre + "mlp.gate.e_score_correction_bias"])
    out = model.forward(cfg, variables, jnp.asarray(_tokens(cfg.vocab_size)))
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (B, T, cfg.vocab_size)
    assert np.isfinite(np.asarray(out.mtp_logits[0])).all()


def test_fused_expert_tensors_load(checkpoints, tmp_path):
    _, m = checkpoints["groups-qlora-dense1"]
    m.save_pretrained(tmp_path, save_original_format=False)
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert "model.layers.1.mlp.experts.gate_up_proj" in names  # transformers' in-memory form
    _assert_trees_equal(hf.load(tmp_path)[1], hf.load(checkpoints["groups-qlora-dense1"][0])[1])


def _quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight recipe: per 128x128 block, scale = amax / 448, stored as scale_inv."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = tile.abs().max().clamp(min=1e-4) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = tile / scale[i, j]
    return q, scale


def test_fp8_block_dequantization(tmp_path):
    # Dims above 128 and not multiples of it, so edge blocks are partial.
    config = _hf_config(
        hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=136,
        kv_lora_rank=144, n_routed_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
    )  # fmt: skip
    _random_hf_model(config).save_pretrained(tmp_path / "orig")
    tensors = st_torch.load_file(str(tmp_path / "orig" / "model.safetensors"))
    quantized, dequantized = dict(tensors), dict(tensors)
    for name, w in tensors.items():
        if name.endswith("proj.weight"):  # DeepSeek keeps embed, head, norms, router in bf16
            q, s = _quantize_fp8(w)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            expand = s.repeat_interleave(128, 0).repeat_interleave(128, 1)
            dequantized[name] = q.float() * expand[: w.shape[0], : w.shape[1]]
    hf_config = json.loads((tmp_path / "orig" / "config.json").read_text())
    for name, ts in (("fp8", quantized), ("deq", dequantized)):
        (tmp_path / name).mkdir()
        st_torch.save_file(
            ts, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"}
        )
        quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
        text = json.dumps(hf_config | {"quantization_config": quant})
        (tmp_path / name / "config.json").write_text(text)
    _, fp8 = hf.load(tmp_path / "fp8")
    _assert_trees_equal(fp8, hf.load(tmp_path / "deq")[1])
    orig = hf.load(tmp_path / "orig")[1]
    for x, y in zip(jax.tree.leaves(fp8), jax.tree.leaves(orig), strict=True):
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus subnormals near zero
        np.testing.assert_allclose(x, y, rtol=2.0**-4, atol=1e-3 * float(np.abs(y).max()))
