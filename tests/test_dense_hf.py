"""The dense students against transformers: logits of LlamaForCausalLM and Qwen2ForCausalLM in
float32 on random tiny configs (GQA ratios, tied and untied heads, Llama 3 rope scaling, q/k/v
biases), greedy generation over the GQA cache against `generate`, and save / load round trips
that transformers reads back. Needs the `parity` extra (torch, transformers)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity
B, T = 2, 24
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
_LLAMA3 |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {
    # Llama 3: GQA 4:1, untied, llama3 rope scaling (theta 500000 as Llama 3.1)
    "llama-gqa4-llama3rope": ("llama", {
        "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 500000.0,
        "rope_parameters": _LLAMA3 | {"rope_theta": 500000.0}, "max_position_embeddings": 128,
    }),
    # Llama: multi-head (ratio 1), tied embeddings, head_dim unlike hidden / heads, no scaling
    "llama-mha-tied-headdim": ("llama", {
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 12,
        "tie_word_embeddings": True,
    }),
    # Qwen2.5-small-style: GQA 3:1 with q/k/v biases, tied head
    "qwen2-gqa3-tied": ("qwen2", {
        "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "rope_theta": 1e6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    }),
    # Qwen2.5-7B-style: GQA 2:1 (MQA would be 1 KV head), biases, untied, 3 layers
    "qwen2-mqa-untied": ("qwen2", {
        "num_attention_heads": 4, "num_key_value_heads": 1, "num_hidden_layers": 3,
    }),
}  # fmt: skip
_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


def _random_hf_model(family: str, changes: dict, seed: int):
    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              max_position_embeddings=64, rms_norm_eps=1e-6)  # fmt: skip
    config = getattr(transformers, _CONFIGS[family])(**(kw | changes))
    torch.manual_seed(seed)
    m = getattr(transformers, _CLASSES[family])(config).float().eval()
    m.config._attn_implementation = "eager"
    with torch.no_grad():  # weights ~ N(0, 1/fan_in): attention far from uniform; norms near 1
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return m


def _tokens(vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def _torch_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(input_ids=torch.as_tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (dir written by save_pretrained, the torch model)."""
    out = {}
    for i, (name, (family, changes)) in enumerate(CONFIGS.items()):
        m = _random_hf_model(family, changes, seed=i)
        path = tmp_path_factory.mktemp(name)
        m.save_pretrained(path)
        out[name] = (path, m)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    path, m = checkpoints[name]
    cfg, variables = hf.load(path)
    family, changes = CONFIGS[name]
    g = cfg.gqa
    assert (g.num_heads, g.num_kv_heads) == (
        changes["num_attention_heads"],
        changes["num_key_value_heads"],
    )
    assert g.qkv_bias == (family == "qwen2")
    assert cfg.tie_embeddings == changes.get("tie_word_embeddings", False)
    assert (g.llama3_scaling is not None) == ("llama3" in json.dumps(changes))
    assert ("lm_head" in variables["params"]) != cfg.tie_embeddings
    tokens = _tokens(cfg.vocab_size)
    want = _torch_logits(m, tokens)
    got = np.asarray(model.forward(cfg, variables, jnp.asarray(tokens)).logits)
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |jax - torch| logits = {diff:.3g} (logit scale {np.abs(want).max():.3g})")
    assert diff < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_transformers(checkpoints, name):
    """Prefill + cached GQA decode against HF generate, token for token, left-padded rows."""
    path, m = checkpoints[name]
    cfg, variables = hf.load(path)
    prompts = _tokens(cfg.vocab_size, seed=3)[:, :8]
    with torch.no_grad():
        want = m.generate(
            torch.as_tensor(prompts), max_new_tokens=12, do_sample=False, min_new_tokens=12
        )[:, prompts.shape[1] :].numpy()
    # Rows of different lengths decode in one left-padded batch: the short row alone first.
    short = model.generate(
        cfg, variables, [prompts[0, 3:].tolist()], max_new_tokens=12, temperature=0
    )
    got = model.generate(
        cfg, variables, [prompts[0, 3:].tolist(), *prompts.tolist()], max_new_tokens=12,
        temperature=0,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.tokens)[1:], want)
    np.testing.assert_array_equal(np.asarray(got.tokens)[0], np.asarray(short.tokens)[0])


def test_save_load_round_trip_and_transformers_reads_it(checkpoints, tmp_path):
    for name in ("llama-gqa4-llama3rope", "qwen2-gqa3-tied"):
        path, m = checkpoints[name]
        cfg, variables = hf.load(path)
        out = tmp_path / name
        hf.save(cfg, variables, out, max_shard_bytes=20_000)  # sharded, with an index
        assert len(list(out.glob("*.safetensors"))) > 1
        cfg2, variables2 = hf.load(out)
        assert cfg2 == cfg
        for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        family = CONFIGS[name][0]
        assert json.loads((out / "config.json").read_text())["model_type"] == family
        loaded = (
            getattr(transformers, _CLASSES[family])
            .from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
            .eval()
        )
        tokens = _tokens(cfg.vocab_size)
        np.testing.assert_array_equal(_torch_logits(loaded, tokens), _torch_logits(m, tokens))


def test_a_tied_checkpoint_that_also_stores_the_head_loads(checkpoints, tmp_path):
    """Some tied checkpoints keep an lm_head.weight copy; transformers ties it to the embedding,
    so does load (and a checkpoint lacking a tensor its config needs is an error)."""
    from safetensors.numpy import load_file, save_file

    path, m = checkpoints["qwen2-gqa3-tied"]
    tensors = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "extra").mkdir()
    extra = tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"] + 1}
    save_file(extra, str(tmp_path / "extra" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "extra" / "config.json").write_text(json.dumps(config))
    cfg, variables = hf.load(tmp_path / "extra")
    tokens = _tokens(cfg.vocab_size)
    got = np.asarray(model.forward(cfg, variables, jnp.asarray(tokens)).logits)
    assert np.abs(got - _torch_logits(m, tokens)).max() < 1e-4

    (tmp_path / "untied").mkdir()
    save_file(tensors, str(tmp_path / "untied" / "model.safetensors"), metadata={"format": "pt"})
    untied = config | {"tie_word_embeddings": False}
    (tmp_path / "untied" / "config.json").write_text(json.dumps(untied))
    with pytest.raises(ValueError, match=r"missing tensors.*lm_head\.weight"):
        hf.load(tmp_path / "untied")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 4, "num_attention_heads": 6}, "multiple of num_kv_heads"),
    ],
)
def test_unsupported_dense_configs_fail_naming_the_key(checkpoints, tmp_path, changes, match):
    path, _ = checkpoints["qwen2-gqa3-tied"]
    config = json.loads((path / "config.json").read_text()) | changes
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        hf.load(tmp_path)
