"""Mapping between a DeepSeek-V3 Hugging Face `config.json` and `ModelConfig`.

Reads both the form DeepSeek published (`rope_theta` + `rope_scaling`, `num_nextn_predict_layers`)
and the form newer transformers writes (`rope_parameters`, which also carries `rope_theta`).
Writes DeepSeek's form, which transformers reads too. Options the model does not implement
(softmax routing, greedy top-k, non-interleaved RoPE, ...) fail with a `ValueError` instead of
loading into a model that silently computes something else.
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


def _get(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    return hf[key]


def _rope(hf: Mapping[str, Any]) -> tuple[float, YarnConfig | None]:
    """(rope_theta, yarn) from `rope_parameters` (new form) or `rope_theta`+`rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"config.json: rope parameters must be an object, got {params!r}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"config.json: partial_rotary_factor={params['partial_rotary_factor']} unsupported; "
            "MLA already rotates only the qk_rope_head_dim part (valid: 1.0)"
        )
    if kind == "default":
        return float(theta), None
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
        factor=float(params["factor"]),
        original_max_position=int(params["original_max_position_embeddings"]),
        beta_fast=float(params["beta_fast"]),
        beta_slow=float(params["beta_slow"]),
        mscale=float(params["mscale"]),
        mscale_all_dim=float(params["mscale_all_dim"]),
    )
    return float(theta), yarn


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
    theta, yarn = _rope(hf)
    heads = int(_get(hf, "num_attention_heads"))
    q_lora = hf.get("q_lora_rank")
    mla = MLAConfig(
        num_heads=heads,
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(_get(hf, "kv_lora_rank")),
        qk_nope_head_dim=int(_get(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_get(hf, "qk_rope_head_dim")),
        v_head_dim=int(_get(hf, "v_head_dim")),
        rope_theta=theta,
        yarn=yarn,
    )
    num_layers = int(_get(hf, "num_hidden_layers"))
    moe = None
    if hf.get("n_routed_experts"):
        moe = MoEConfig(
            num_experts=int(hf["n_routed_experts"]),
            num_shared_experts=int(hf.get("n_shared_experts") or 0),
            top_k=int(_get(hf, "num_experts_per_tok")),
            expert_dim=int(_get(hf, "moe_intermediate_size")),
            num_groups=int(hf.get("n_group") or 1),
            top_groups=int(hf.get("topk_group") or 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        )
    first_dense = hf.get("first_k_dense_replace")
    return ModelConfig(
        vocab_size=int(_get(hf, "vocab_size")),
        d_model=int(_get(hf, "hidden_size")),
        num_layers=num_layers,
        num_dense_layers=min(int(first_dense or 0), num_layers),
        dense_dim=int(_get(hf, "intermediate_size")),
        mla=mla,
        moe=moe,
        mtp_depth=mtp_depth,
        max_seq_len=int(_get(hf, "max_position_embeddings")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
        param_dtype=param_dtype,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents in DeepSeek's published form (loadable by transformers too)."""
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
