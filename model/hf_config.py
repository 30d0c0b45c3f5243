"""Mapping between a DeepSeek-V3 Hugging Face `config.json` and `ModelConfig`.

Reads both the form DeepSeek published (`rope_theta` + `rope_scaling`, `num_nextn_predict_layers`)
and the form newer transformers writes (`rope_parameters`, which also carries `rope_theta`).
Writes DeepSeek's form, which transformers reads too. Options the model does not implement
(softmax routing, greedy top-k, non-interleaved RoPE, ...) fail with a `ValueError` instead of
loading into a model that silently computes something else. Keys config.json omits take
transformers' `DeepseekV3Config` defaults (`HF_DEFAULTS`); a null or mistyped value is an error
naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.config import MLAConfig, ModelConfig, MoEConfig, YarnConfig

# Keys whose value must be exactly this for the model to compute what the checkpoint expects.
_REQUIRED_VALUES = {
    "hidden_act": "silu",
    "scoring_func": "sigmoid",  # V3 routes with sigmoid scores (V2 used softmax)
    "topk_method": "noaux_tc",  # bias-corrected group-limited top-k (V2 used greedy/group_limited)
    "moe_layer_freq": 1,  # every layer after first_k_dense_replace is MoE
    "rope_interleave": True,  # RoPE rotates (x[2i], x[2i+1]) pairs, as in DeepSeek's code
    "attention_bias": False,
    "tie_word_embeddings": False,  # lm_head is its own matrix
}
_YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


# transformers' DeepseekV3Config defaults (checked in 5.24) for the keys config.json may omit.
# A missing key takes the value transformers would run with, so a config.json that both load
# means one model; router keys especially, which no tensor shape would catch. Sizes (vocab,
# widths, heads, layers, experts) have no default here: a config without them is an error.
HF_DEFAULTS: dict[str, Any] = {
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 3,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
}
_REQUIRED = object()


def _value(hf: Mapping[str, Any], key: str, default: Any) -> Any:
    if key not in hf and default is not _REQUIRED:
        return default
    if hf.get(key) is None:
        why = "missing required field" if key not in hf else "null for field"
        hint = "" if default is _REQUIRED else f" (omit it for transformers' default {default!r})"
        raise ValueError(f"config.json: {why} {key!r}{hint}")
    return hf[key]


def _int(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> int:
    value = _value(hf, key, default)
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise ValueError(f"config.json: {key}={value!r} must be an integer")
    return int(value)


def _float(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> float:
    value = _value(hf, key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config.json: {key}={value!r} must be a number")
    return float(value)


def _bool(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> bool:
    value = _value(hf, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"config.json: {key}={value!r} must be true or false")
    return value


def rope_params(hf: Mapping[str, Any], default_theta: float) -> tuple[Mapping, float, str]:
    """(rope parameters, rope_theta, rope type) from `rope_parameters` (transformers 5's form,
    which carries rope_theta) or `rope_theta` + `rope_scaling` (the published form)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"config.json: rope parameters must be an object, got {params!r}")
    if "rope_theta" in params:
        theta = _float(params, "rope_theta")
    else:
        theta = _float(hf, "rope_theta", default_theta)
    return params, theta, params.get("rope_type", params.get("type", "default"))


def _rope(hf: Mapping[str, Any]) -> tuple[float, YarnConfig | None]:
    """(rope_theta, yarn) from `rope_parameters` (new form) or `rope_theta`+`rope_scaling`."""
    params, theta, kind = rope_params(hf, HF_DEFAULTS["rope_theta"])
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"config.json: partial_rotary_factor={params['partial_rotary_factor']} unsupported; "
            "MLA already rotates only the qk_rope_head_dim part (valid: 1.0)"
        )
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(f"config.json: rope type {kind!r} unsupported (valid: 'default', 'yarn')")
    missing = [k for k in _YARN_KEYS if params.get(k) is None]
    if missing:
        # transformers' fallbacks for absent mscale/mscale_all_dim rescale cos/sin instead of
        # the softmax, which the model does not reproduce; DeepSeek's configs always set them.
        raise ValueError(f"config.json: yarn rope parameters lack {missing}")
    if not params.get("truncate", True):
        raise ValueError("config.json: yarn truncate=false unsupported (DeepSeek floors/ceils)")
    if params.get("attention_factor") is not None:
        raise ValueError(
            "config.json: yarn attention_factor unsupported; use mscale/mscale_all_dim"
        )
    yarn = YarnConfig(
        factor=_float(params, "factor"),
        original_max_position=_int(params, "original_max_position_embeddings"),
        beta_fast=_float(params, "beta_fast"),
        beta_slow=_float(params, "beta_slow"),
        mscale=_float(params, "mscale"),
        mscale_all_dim=_float(params, "mscale_all_dim"),
    )
    return theta, yarn


def declared_mtp_depth(hf: Mapping[str, Any]) -> int:
    """MTP modules the config declares (`num_nextn_predict_layers`, or `num_mtp_layers`)."""
    value = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0))
    return int(value or 0)


def fp8_block_size(hf: Mapping[str, Any]) -> tuple[int, int]:
    """Rows x cols of one FP8 weight-scale block (V3: 128 x 128)."""
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method", "fp8")
    if method != "fp8":
        raise ValueError(f"config.json: quantization_config.quant_method={method!r} (valid: 'fp8')")
    rows, cols = quant.get("weight_block_size") or (128, 128)
    return int(rows), int(cols)


def config_from_hf(
    hf: Mapping[str, Any], *, mtp_depth: int, param_dtype: str = "float32"
) -> ModelConfig:
    """ModelConfig from a parsed config.json; `mtp_depth` is what the checkpoint really holds."""
    if hf.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise ValueError(f"config.json: model_type={hf['model_type']!r} (valid: 'deepseek_v3')")
    for key, want in _REQUIRED_VALUES.items():
        if key in hf and hf[key] is not None and hf[key] != want:
            raise ValueError(f"config.json: {key}={hf[key]!r} unsupported (valid: {want!r})")
    try:
        return _config_from_hf(hf, mtp_depth, param_dtype)
    except ValueError as err:
        defaulted = {k: v for k, v in HF_DEFAULTS.items() if k not in hf}
        if not defaulted or str(err).startswith("config.json"):
            raise
        raise ValueError(f"{err} (config.json omits {defaulted}: transformers' defaults)") from err


def _config_from_hf(hf: Mapping[str, Any], mtp_depth: int, param_dtype: str) -> ModelConfig:
    theta, yarn = _rope(hf)
    q_lora = hf.get("q_lora_rank")  # null: no query compression (V2-Lite)
    mla = MLAConfig(
        num_heads=_int(hf, "num_attention_heads"),
        q_lora_rank=None if q_lora is None else _int(hf, "q_lora_rank"),
        kv_lora_rank=_int(hf, "kv_lora_rank"),
        qk_nope_head_dim=_int(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=_int(hf, "qk_rope_head_dim"),
        v_head_dim=_int(hf, "v_head_dim"),
        rope_theta=theta,
        yarn=yarn,
    )
    num_layers = _int(hf, "num_hidden_layers")
    moe = None
    # No n_routed_experts (or 0): a dense model, as `config_to_hf` writes one.
    if hf.get("n_routed_experts"):
        d = HF_DEFAULTS
        moe = MoEConfig(
            num_experts=_int(hf, "n_routed_experts"),
            num_shared_experts=_int(hf, "n_shared_experts", d["n_shared_experts"]),
            top_k=_int(hf, "num_experts_per_tok"),
            expert_dim=_int(hf, "moe_intermediate_size"),
            num_groups=_int(hf, "n_group", d["n_group"]),
            top_groups=_int(hf, "topk_group", d["topk_group"]),
            routed_scaling_factor=_float(hf, "routed_scaling_factor", d["routed_scaling_factor"]),
            norm_topk_prob=_bool(hf, "norm_topk_prob", d["norm_topk_prob"]),
        )
    first_dense = _int(hf, "first_k_dense_replace", HF_DEFAULTS["first_k_dense_replace"])
    return ModelConfig(
        vocab_size=_int(hf, "vocab_size"),
        d_model=_int(hf, "hidden_size"),
        num_layers=num_layers,
        num_dense_layers=min(first_dense, num_layers),
        dense_dim=_int(hf, "intermediate_size"),
        mla=mla,
        moe=moe,
        mtp_depth=mtp_depth,
        max_seq_len=_int(hf, "max_position_embeddings"),
        norm_eps=_float(hf, "rms_norm_eps", HF_DEFAULTS["rms_norm_eps"]),
        init_std=_float(hf, "initializer_range", HF_DEFAULTS["initializer_range"]),
        param_dtype=param_dtype,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents in DeepSeek's published form (loadable by transformers too)."""
    if cfg.mla is None or cfg.tie_embeddings:
        raise ValueError(
            "a DeepSeek-V3 checkpoint has MLA attention and an untied head; got "
            f"mla={cfg.mla!r}, tie_embeddings={cfg.tie_embeddings} (dense GQA models are "
            "written as Llama / Qwen2: model.hf_dense_config)"
        )
    mla = cfg.mla
    rope_scaling = None
    if mla.yarn is not None:
        y = mla.yarn
        rope_scaling = {
            "type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }
    hf: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.dense_dim,
        "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.num_dense_layers,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "num_attention_heads": mla.num_heads,
        # transformers' eager attention repeats kv num_heads / num_key_value_heads times; MLA
        # expands kv per head itself, so the ratio must be 1.
        "num_key_value_heads": mla.num_heads,
        "q_lora_rank": mla.q_lora_rank,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_head_dim,
        "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "rope_theta": mla.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.moe is not None:
        moe = cfg.moe
        hf.update(
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=moe.expert_dim,
            n_group=moe.num_groups,
            topk_group=moe.top_groups,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=moe.norm_topk_prob,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            moe_layer_freq=1,
        )
    return hf
