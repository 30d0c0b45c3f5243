"""Mapping between a Llama or Qwen2 Hugging Face `config.json` and a dense GQA `ModelConfig`.

The dense students of R1's distillation: Llama 3.x (`model_type: llama`, rope type `default`
or `llama3`) and Qwen2 / Qwen2.5 (`model_type: qwen2`, q/k/v biases). Both forms of the rope
settings are read (`rope_theta` + `rope_scaling`, and transformers 5's `rope_parameters`).
Options the model does not implement (sliding-window attention, MLP or output biases, other
rope types, tensor-parallel slicing) fail with a `ValueError` naming the key. Keys config.json
omits take transformers' defaults (checked in 5.24; `DENSE_DEFAULTS`). `dense_config_to_hf`
writes `qwen2` for a model with q/k/v biases and `llama` otherwise, so both round-trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.config import GQAConfig, Llama3RopeScaling, ModelConfig
from model.hf_config import _bool, _float, _int, rope_params

DENSE_TYPES = ("llama", "qwen2")

# transformers' LlamaConfig / Qwen2Config defaults (5.24) for the keys config.json may omit.
DENSE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "initializer_range": 0.02, "max_position_embeddings": 2048},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "initializer_range": 0.02, "max_position_embeddings": 32768},
}  # fmt: skip
_REQUIRED_VALUES = {
    "llama": {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
              "pretraining_tp": 1},
    "qwen2": {"hidden_act": "silu", "use_sliding_window": False},
}  # fmt: skip
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[float, Any]:
    params, theta, kind = rope_params(hf, defaults["rope_theta"])
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json: partial_rotary_factor unsupported (valid: 1.0)")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(
            f"config.json: rope type {kind!r} unsupported for a dense model "
            "(valid: 'default', 'llama3')"
        )
    missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
    if missing:
        raise ValueError(f"config.json: llama3 rope parameters lack {missing}")
    scaling = Llama3RopeScaling(
        factor=_float(params, "factor"),
        low_freq_factor=_float(params, "low_freq_factor"),
        high_freq_factor=_float(params, "high_freq_factor"),
        original_max_position=_int(params, "original_max_position_embeddings"),
    )
    return theta, scaling


def dense_config_from_hf(hf: Mapping[str, Any], *, param_dtype: str = "float32") -> ModelConfig:
    """ModelConfig of a Llama / Qwen2 config.json."""
    kind = hf.get("model_type")
    if kind not in DENSE_TYPES:
        raise ValueError(f"config.json: model_type={kind!r} (valid: {DENSE_TYPES})")
    for key, want in _REQUIRED_VALUES[kind].items():
        if key in hf and hf[key] is not None and hf[key] != want:
            raise ValueError(f"config.json: {key}={hf[key]!r} unsupported (valid: {want!r})")
    d = DENSE_DEFAULTS[kind]
    theta, scaling = _rope(hf, d)
    hidden, heads = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    gqa = GQAConfig(
        num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", heads),
        head_dim=hidden // heads if head_dim is None else _int(hf, "head_dim"),
        rope_theta=theta,
        llama3_scaling=scaling,
        qkv_bias=kind == "qwen2",  # Qwen2 always has q/k/v biases, Llama (as required) none
    )
    layers = _int(hf, "num_hidden_layers")
    return ModelConfig(
        vocab_size=_int(hf, "vocab_size"),
        d_model=hidden,
        num_layers=layers,
        num_dense_layers=layers,
        dense_dim=_int(hf, "intermediate_size"),
        mla=None,
        moe=None,
        gqa=gqa,
        tie_embeddings=_bool(hf, "tie_word_embeddings", d["tie_word_embeddings"]),
        max_seq_len=_int(hf, "max_position_embeddings", d["max_position_embeddings"]),
        norm_eps=_float(hf, "rms_norm_eps", d["rms_norm_eps"]),
        init_std=_float(hf, "initializer_range", d["initializer_range"]),
        param_dtype=param_dtype,
    )


def dense_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of a dense GQA model: `qwen2` with q/k/v biases, else `llama`."""
    g = cfg.gqa
    if g is None or cfg.moe is not None or cfg.mtp_depth or cfg.num_dense_layers != cfg.num_layers:
        raise ValueError(
            "a Llama / Qwen2 checkpoint is a dense GQA model with no MoE layers and no MTP; "
            f"got gqa={g!r}, moe={cfg.moe!r}, mtp_depth={cfg.mtp_depth}"
        )
    kind = "qwen2" if g.qkv_bias else "llama"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": g.rope_theta}
    if (s := g.llama3_scaling) is not None:
        rope |= {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    hf: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.dense_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": g.num_heads,
        "num_key_value_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "rope_theta": g.rope_theta,
        "rope_scaling": None if s is None else rope,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": cfg.param_dtype,
    }
    if kind == "llama":
        hf |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    else:
        hf |= {"use_sliding_window": False}
    return hf
