"""Model FLOPs per trained token, for MFU (the BENCHMARKS.md convention).

FLOPs per token = 6 x activated matmul parameters (the LM head included, the input embedding
lookup not) + 3 x the attention score and value FLOPs at full sequence length (not halved for
causality). MTP modules add their activated block, their projection and another head.
"""

from __future__ import annotations

import model
from model import ModelConfig


def _attention_flops(cfg: ModelConfig, seq_len: int, layers: int) -> float:
    if cfg.gqa is not None:
        per_layer = 2 * seq_len * cfg.gqa.num_heads * 2 * cfg.gqa.head_dim
        return float(per_layer * layers)
    mla = cfg.mla
    per_layer = 2 * seq_len * mla.num_heads * (mla.qk_head_dim + mla.v_head_dim)
    return float(per_layer * layers)


def _activated_block_params(cfg: ModelConfig) -> float:
    """Matmul parameters a token uses in one MTP block (MoE or dense, as in the model)."""
    d, mla, g = cfg.d_model, cfg.mla, cfg.gqa
    if g is not None:
        attn = d * g.head_dim * (2 * g.num_heads + 2 * g.num_kv_heads)
    else:
        q = d * mla.num_heads * mla.qk_head_dim
        if mla.q_lora_rank is not None:
            q = d * mla.q_lora_rank + mla.q_lora_rank * mla.num_heads * mla.qk_head_dim
        kv = d * (mla.kv_lora_rank + mla.qk_rope_head_dim)
        kv += mla.kv_lora_rank * mla.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        attn = q + kv + mla.num_heads * mla.v_head_dim * d
    if cfg.mtp_uses_moe:
        moe = cfg.moe
        ffn = 3 * d * moe.expert_dim * (moe.top_k + moe.num_shared_experts) + d * moe.num_experts
    else:
        ffn = 3 * d * cfg.dense_dim
    return float(attn + ffn)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    counts = model.count_params(cfg)
    flops = 6.0 * counts.activated + 3.0 * _attention_flops(cfg, seq_len, cfg.num_layers)
    if cfg.mtp_depth:
        head = cfg.d_model * cfg.vocab_size
        per_depth = _activated_block_params(cfg) + 2 * cfg.d_model * cfg.d_model + head
        flops += cfg.mtp_depth * (6.0 * per_depth + 3.0 * _attention_flops(cfg, seq_len, 1))
    return flops
