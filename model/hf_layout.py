"""The checkpoint-name <-> variables-tree mapping: every HF tensor's leaf, index, shape, map."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from model.config import ModelConfig

_Leaf = tuple[str, tuple[str, ...]]  # (collection, path inside it)


# --- layout maps: (HF array -> jax arrays, jax array -> HF array) ---------------------------


class _Map(NamedTuple):
    to_jax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[[np.ndarray], np.ndarray] | None


_COPY = _Map(lambda x: (x,), lambda y: y)
_LINEAR = _Map(lambda x: (x.T,), lambda y: y.T)  # torch Linear weights are [out, in]


def _heads_out(heads: int) -> _Map:
    """[H*k, in] (torch, output split per head) <-> [in, H, k]."""
    return _Map(
        lambda x: (x.T.reshape(x.shape[1], heads, -1),),
        lambda y: y.reshape(y.shape[0], -1).T,
    )


def _heads_in(heads: int) -> _Map:
    """[out, H*v] (torch, input concatenated over heads) <-> [H, v, out]."""
    return _Map(
        lambda x: (x.T.reshape(heads, -1, x.shape[0]),),
        lambda y: y.reshape(-1, y.shape[-1]).T,
    )


def _bias(heads: int) -> _Map:
    """[H*k] (torch) <-> [H, k]."""
    return _Map(lambda x: (x.reshape(heads, -1),), lambda y: y.reshape(-1))


def _fused_gate_up(f: int) -> _Map:
    """transformers' [E, 2F, D] (gate rows, then up rows) -> two [E, D, F]; load only."""
    return _Map(lambda x: (x[:, :f].transpose(0, 2, 1), x[:, f:].transpose(0, 2, 1)), None)


_FUSED_DOWN = _Map(lambda x: (x.transpose(0, 2, 1),), None)  # [E, D, F] -> [E, F, D]


# --- the name/shape contract -----------------------------------------------------------------


class _Entry(NamedTuple):
    """One tensor of a block: HF suffix, our leaf path(s), HF shape, our per-slot shape, map."""

    suffix: str
    paths: str  # '/'-separated leaf path; two, comma-separated, for transformers' fused gate_up
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    map: _Map
    collection: str = "params"
    expert: int | None = None  # index into the leaf's expert axis (one tensor per expert)


_e = _Entry  # short alias: the tables below then read as one line per tensor


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One checkpoint tensor: the leaves it fills, at which stack index, and its layout."""

    leaves: tuple[_Leaf, ...]
    index: tuple[int, ...]
    hf_shape: tuple[int, ...]
    map: _Map


class _CheckpointMap(NamedTuple):
    """Every checkpoint tensor's slot in the variables tree, and each leaf's shapes."""

    slots: dict[str, _Slot]  # checkpoint name -> slot
    shapes: dict[_Leaf, tuple[int, ...]]  # full leaf shape
    stacks: dict[_Leaf, tuple[int, ...]]  # its leading stack axes (layer, expert)


def _swiglu(pre: str, path: str, d: int, f: int, expert: int | None = None) -> list[_Entry]:
    """gate/up/down projections of one SwiGLU FFN (dense MLP, routed or shared expert)."""
    return [
        _e(pre + "gate_proj.weight", path + "wi_gate", (f, d), (d, f), _LINEAR, expert=expert),
        _e(pre + "up_proj.weight", path + "wi_up", (f, d), (d, f), _LINEAR, expert=expert),
        _e(pre + "down_proj.weight", path + "wo", (d, f), (f, d), _LINEAR, expert=expert),
    ]


def _gqa(cfg: ModelConfig) -> list[_Entry]:
    """GQA tensors (Llama / Qwen2 names) and the two block norms."""
    g, d, a = cfg.gqa, cfg.d_model, "self_attn."
    h, kv, k = g.num_heads, g.num_kv_heads, g.head_dim
    out = [
        _e("input_layernorm.weight", "attn_norm/scale", (d,), (d,), _COPY),
        _e("post_attention_layernorm.weight", "ffn_norm/scale", (d,), (d,), _COPY),
        _e(a + "q_proj.weight", "attn/wq", (h * k, d), (d, h, k), _heads_out(h)),
        _e(a + "k_proj.weight", "attn/wk", (kv * k, d), (d, kv, k), _heads_out(kv)),
        _e(a + "v_proj.weight", "attn/wv", (kv * k, d), (d, kv, k), _heads_out(kv)),
        _e(a + "o_proj.weight", "attn/wo", (d, h * k), (h, k, d), _heads_in(h)),
    ]
    if g.qkv_bias:
        out += [
            _e(a + "q_proj.bias", "attn/bq", (h * k,), (h, k), _bias(h)),
            _e(a + "k_proj.bias", "attn/bk", (kv * k,), (kv, k), _bias(kv)),
            _e(a + "v_proj.bias", "attn/bv", (kv * k,), (kv, k), _bias(kv)),
        ]
    return out


def _attention(cfg: ModelConfig) -> list[_Entry]:
    """MLA (or GQA) tensors and the two block norms."""
    if cfg.gqa is not None:
        return _gqa(cfg)
    mla, d, a = cfg.mla, cfg.d_model, "self_attn."
    h, qk, kvl, v = mla.num_heads, mla.qk_head_dim, mla.kv_lora_rank, mla.v_head_dim
    kv_a, kv_b = kvl + mla.qk_rope_head_dim, mla.qk_nope_head_dim + v
    out = [
        _e("input_layernorm.weight", "attn_norm/scale", (d,), (d,), _COPY),
        _e("post_attention_layernorm.weight", "ffn_norm/scale", (d,), (d,), _COPY),
        _e(a + "kv_a_proj_with_mqa.weight", "attn/wkv_a", (kv_a, d), (d, kv_a), _LINEAR),
        _e(a + "kv_a_layernorm.weight", "attn/kv_norm/scale", (kvl,), (kvl,), _COPY),
        _e(a + "kv_b_proj.weight", "attn/wkv_b", (h * kv_b, kvl), (kvl, h, kv_b), _heads_out(h)),
        _e(a + "o_proj.weight", "attn/wo", (d, h * v), (h, v, d), _heads_in(h)),
    ]
    if (ql := mla.q_lora_rank) is None:
        return [*out, _e(a + "q_proj.weight", "attn/wq", (h * qk, d), (d, h, qk), _heads_out(h))]
    return [
        *out,
        _e(a + "q_a_proj.weight", "attn/wq_a", (ql, d), (d, ql), _LINEAR),
        _e(a + "q_a_layernorm.weight", "attn/q_norm/scale", (ql,), (ql,), _COPY),
        _e(a + "q_b_proj.weight", "attn/wq_b", (h * qk, ql), (ql, h, qk), _heads_out(h)),
    ]


def _moe(cfg: ModelConfig, fused: bool) -> list[_Entry]:
    """Router, routed experts (per expert, or transformers' fused form) and shared experts."""
    d, n, f, shared = (
        cfg.d_model,
        cfg.moe.num_experts,
        cfg.moe.expert_dim,
        cfg.moe.num_shared_experts,
    )
    out = [
        _e("mlp.gate.weight", "moe/router/kernel", (n, d), (d, n), _LINEAR),
        _e("mlp.gate.e_score_correction_bias", "moe/router/bias", (n,), (n,), _COPY, "router_bias"),
    ]
    if fused:
        gate_up = "moe/experts/wi_gate,moe/experts/wi_up"
        out.append(
            _e("mlp.experts.gate_up_proj", gate_up, (n, 2 * f, d), (n, d, f), _fused_gate_up(f))
        )
        out.append(_e("mlp.experts.down_proj", "moe/experts/wo", (n, d, f), (n, f, d), _FUSED_DOWN))
    else:
        for i in range(n):
            out += _swiglu(f"mlp.experts.{i}.", "moe/experts/", d, f, expert=i)
    if shared:
        out += _swiglu("mlp.shared_experts.", "moe/shared/", d, f * shared)
    return out


def _layout(cfg: ModelConfig, *, fused: bool = False) -> _CheckpointMap:
    """Every checkpoint tensor of `cfg` and every leaf of the variables tree."""
    out = _CheckpointMap({}, {}, {})

    def add(entries: list[_Entry], pre: str, stack: str, index: tuple[int, ...], size: tuple):
        for entry in entries:
            ix, sz = index, size
            if entry.expert is not None:
                ix, sz = (*index, entry.expert), (*size, cfg.moe.num_experts)
            paths = entry.paths.split(",")
            leaves = tuple((entry.collection, tuple((stack + p).split("/"))) for p in paths)
            for leaf in leaves:
                out.shapes[leaf], out.stacks[leaf] = sz + entry.shape, sz
            out.slots[pre + entry.suffix] = _Slot(leaves, ix, entry.hf_shape, entry.map)

    d, v = cfg.d_model, cfg.vocab_size
    add([_e("model.embed_tokens.weight", "embed/embedding", (v, d), (v, d), _COPY)], "", "", (), ())
    dense, ffn = _attention(cfg) + _swiglu("mlp.", "mlp/", d, cfg.dense_dim), []
    if cfg.moe is not None:
        ffn = _attention(cfg) + _moe(cfg, fused)
    for i in range(cfg.num_layers):
        pre, j = f"model.layers.{i}.", i - cfg.num_dense_layers
        if j < 0:
            add(dense, pre, "dense_layers/", (i,), (cfg.num_dense_layers,))
        else:
            add(ffn, pre, "moe_layers/", (j,), (cfg.num_moe_layers,))
    mtp = [
        _e("enorm.weight", "enorm/scale", (d,), (d,), _COPY),
        _e("hnorm.weight", "hnorm/scale", (d,), (d,), _COPY),
        _e("eh_proj.weight", "eh_proj/kernel", (d, 2 * d), (2 * d, d), _LINEAR),
        _e("shared_head.norm.weight", "final_norm/scale", (d,), (d,), _COPY),
    ]
    for k in range(p := cfg.mtp_depth):
        pre = f"model.layers.{cfg.num_layers + k}."
        add(mtp, pre, "mtp/", (k,), (p,))
        add(ffn if cfg.mtp_uses_moe else dense, pre, "mtp/block/", (k,), (p,))
    add([_e("model.norm.weight", "final_norm/scale", (d,), (d,), _COPY)], "", "", (), ())
    if not cfg.tie_embeddings:
        add([_e("lm_head.weight", "lm_head/kernel", (v, d), (d, v), _LINEAR)], "", "", (), ())
    return out


def _mtp_duplicates(cfg: ModelConfig) -> dict[str, str]:
    """MTP copies of the shared embedding and head (written on save, ignored on load)."""
    out = {}
    for k in range(cfg.mtp_depth):
        pre = f"model.layers.{cfg.num_layers + k}."
        out[pre + "embed_tokens.weight"] = "model.embed_tokens.weight"
        if not cfg.tie_embeddings:
            out[pre + "shared_head.head.weight"] = "lm_head.weight"
    return out
