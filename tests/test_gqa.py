"""The dense GQA students without transformers: grouped attention equals per-head attention over
repeated K/V, the cached decode equals the full forward (left-padded rows, several steps),
packed documents stay apart, tied heads share the embedding, Llama 3's frequency scaling, the
R1-Distill presets' parameter counts against the published checkpoints, and config errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import decode, presets
from model.cache import cache_bytes_per_token, mha_cache_bytes_per_token
from model.config import GQAConfig, Llama3RopeScaling, ModelConfig
from model.dense_presets import DENSE_PRESETS, PUBLISHED_PARAMS
from model.gqa import grouped_attention
from model.rope import gqa_frequencies
from train.flops import flops_per_token
from train.run_dir import to_json


def _cfg(**gqa) -> ModelConfig:
    kw = dict(num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True) | gqa
    return ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, num_dense_layers=2, dense_dim=48, mla=None,
        moe=None, gqa=GQAConfig(**kw), tie_embeddings=True, max_seq_len=64, init_std=0.2,
    )  # fmt: skip


def test_grouped_attention_is_per_head_attention_over_repeated_kv():
    rng = np.random.default_rng(0)
    B, T, H, G, K = 2, 5, 6, 2, 4
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, T, H, K), (B, T, G, K), (B, T, G, K)))  # fmt: skip
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    got = grouped_attention(q, k, v, mask)
    # Query head h reads KV head h // (H / G), as transformers' repeat_kv lays them out.
    k_rep, v_rep = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
    scores = jnp.einsum("bthk,bshk->bhts", q, k_rep) / np.sqrt(K)
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    want = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, -1), v_rep)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("gqa", [{}, {"num_kv_heads": 1, "qkv_bias": False}, {"num_kv_heads": 6}])
def test_cached_decode_equals_the_full_forward(gqa):
    cfg = _cfg(**gqa)
    variables = model.init(cfg, jax.random.key(0))
    rows = [[5, 6, 7, 8, 9, 10], [3, 4, 11]]  # left-padded to 6
    prompts = jnp.asarray([rows[0], [0, 0, 0, *rows[1]]])
    _, _, cache = decode.prefill(cfg, variables, prompts, jnp.asarray([6, 3]), 12)
    steps = [[12, 13], [14, 15], [16, 17]]
    got = []
    for step in steps:
        logits, _, cache = decode.extend(cfg, variables, jnp.asarray(step)[:, None], cache)
        got.append(logits[:, 0])
    chunk = jnp.asarray([[20, 21, 22], [23, 24, 25]])  # several new tokens: causal among them
    logits, _, cache = decode.extend(cfg, variables, chunk, cache)
    for b, row in enumerate(rows):
        tokens = jnp.asarray([row + [s[b] for s in steps] + chunk[b].tolist()])
        want = model.forward(cfg, variables, tokens).logits[0, len(row) :]
        np.testing.assert_allclose(np.stack([g[b] for g in got]), want[:3], atol=2e-5)
        np.testing.assert_allclose(logits[b], want[3:], atol=2e-5)


def test_packed_documents_do_not_attend_to_each_other():
    cfg = _cfg()
    variables = model.init(cfg, jax.random.key(1))
    a, b = [1, 2, 3, 4], [9, 8, 7]
    packed = model.forward(
        cfg, variables, jnp.asarray([a + b]), positions=jnp.asarray([[0, 1, 2, 3, 0, 1, 2]]),
        segment_ids=jnp.asarray([[1, 1, 1, 1, 2, 2, 2]]),
    ).logits[0]  # fmt: skip
    alone = model.forward(cfg, variables, jnp.asarray([b])).logits[0]
    np.testing.assert_allclose(packed[4:], alone, atol=2e-5)


def test_a_tied_head_is_the_embedding_and_its_gradient_reaches_it():
    cfg = _cfg()
    variables = model.init(cfg, jax.random.key(2))
    assert "lm_head" not in variables["params"]
    out = model.forward(cfg, variables, jnp.asarray([[1, 2, 3]]))
    table = variables["params"]["embed"]["embedding"]
    np.testing.assert_allclose(out.logits, out.hidden @ table.T, atol=1e-5)

    def head_only(table_):
        params = variables["params"] | {"embed": {"embedding": table_}}
        return model.forward(cfg, {"params": params}, jnp.asarray([[1, 2, 3]])).logits[0, -1, 5]

    grad = jax.grad(head_only)(table)
    assert float(jnp.abs(grad[5]).max()) > 0  # through the head: row 5 is no input token
    untied = model.init(cfg.replace(tie_embeddings=False), jax.random.key(2))
    assert untied["params"]["lm_head"]["kernel"].shape == (32, 64)
    assert model.count_params(cfg.replace(tie_embeddings=False)).total == (
        model.count_params(cfg).total + 32 * 64
    )


def test_llama3_scaling_keeps_short_wavelengths_and_divides_long_ones():
    base = GQAConfig(4, 1, 64, rope_theta=500000.0)
    scaled = dataclasses.replace(base, llama3_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    f0, f1 = gqa_frequencies(base), gqa_frequencies(scaled)
    wavelen = 2 * np.pi / f0
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_allclose(f1[short], f0[short], rtol=1e-6)
    np.testing.assert_allclose(f1[long], f0[long] / 8, rtol=1e-6)
    middle = ~short & ~long  # between the two: between f0 / 8 and f0
    assert np.all(f1[middle] < f0[middle]) and np.all(f1[middle] > f0[middle] / 8)


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_r1_distill_presets_have_the_published_parameter_counts(name):
    cfg = presets.get(name)
    assert model.count_params(cfg).total == PUBLISHED_PARAMS[name]
    assert cfg.gqa is not None and cfg.moe is None and cfg.num_dense_layers == cfg.num_layers
    assert cfg.gqa.qkv_bias == name.startswith("r1-distill-qwen")
    assert (cfg.gqa.llama3_scaling is not None) == name.startswith("r1-distill-llama")


def test_dense_configs_round_trip_json_and_count_their_cache_and_flops():
    for name in DENSE_PRESETS:
        cfg = presets.get(name)
        assert ModelConfig.from_dict(to_json(cfg)) == cfg
    cfg = presets.get("r1-distill-llama-8b")  # 8 KV heads of 128 against 32 query heads
    assert cache_bytes_per_token(cfg) * 4 == mha_cache_bytes_per_token(cfg)
    assert cache_bytes_per_token(cfg) == 2 * 8 * 128 * 32 * 2  # bf16
    # 6 x activated matmul params (the head included) + attention: ~6 x 7.5B at 4K.
    assert 6 * 7.5e9 < flops_per_token(cfg, 4096) < 6 * 7.5e9 + 3 * 2 * 4096 * 32 * 256 * 32 * 1.01


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.replace(gqa=None), "exactly one attention config"),
        (lambda c: c.replace(mla=presets.get("v3-tiny").mla), "exactly one attention config"),
        (lambda c: c.replace(tie_embeddings=1), "tie_embeddings must be a bool"),
        (lambda c: c.replace(gqa=GQAConfig(6, 4, 8)), "multiple of num_kv_heads"),
        (lambda c: c.replace(gqa=GQAConfig(6, 2, 7)), "head_dim must be even"),
        (lambda c: c.replace(gqa=GQAConfig(6, 2, 8, qkv_bias="yes")), "qkv_bias must be a bool"),
        (lambda c: Llama3RopeScaling(8.0, 4.0, 1.0, 8192), "must exceed low_freq_factor"),
    ],
)
def test_bad_dense_configs_fail_naming_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        change(_cfg())
