"""Prefill and cached decode of the main model and of the first MTP module.

All functions are pure and jit-friendly (cfg static). Called outside a jit, token ids outside
[0, vocab_size) and positions past max_seq_len raise a ValueError (`model.check_inputs`;
under a jit only shapes are checked). Prompts are left-padded: row b of a
[B, P] prompt holds its tokens in the last prompt_lengths[b] columns.

    logits, hidden, cache = prefill(cfg, variables, prompts, lengths, max_len)
    logits, hidden, cache = extend(cfg, variables, next_tokens_Bx1, cache)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.api import check_inputs
from model.cache import KVCache, LayerKV, Mode, from_prefill
from model.config import ModelConfig
from model.layers import axis_rules
from model.transformer import MTPModule, Transformer

MTP = "mtp"


def _prompt_layout(P: int, prompt_lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions [B, P] (0 at each row's first real token) and segment ids (0 pad, 1 prompt)."""
    start_Bx1 = (P - jnp.asarray(prompt_lengths_B, jnp.int32))[:, None]
    slots_P = jnp.arange(P, dtype=jnp.int32)
    positions = jnp.maximum(slots_P - start_Bx1, 0)
    return positions, (slots_P >= start_Bx1).astype(jnp.int32)


def _decode_mode(absorbed: bool) -> Mode:
    return Mode.DECODE if absorbed else Mode.DECODE_EXPANDED


def prefill(
    cfg: ModelConfig,
    variables: dict,
    prompts_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
    max_len: int,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Runs left-padded prompts; returns logits [B, P, V], hidden [B, P, D] and a cache of
    max_len slots holding the prompts. The prompt is computed like training (per-head K/V from
    fresh latents, the cheaper form for many tokens); only the latents are cached."""
    # Ids and prompt positions, not max_len: a left-padded cache may hold more slots than
    # max_seq_len (padding takes slots, not positions); extend checks the positions it reaches.
    positions, segment_ids = _prompt_layout(prompts_BxP.shape[1], prompt_lengths_B)
    check_inputs(cfg, prompts_BxP, positions)
    with axis_rules(cfg):
        logits, hidden, kv = Transformer(cfg, Mode.PREFILL).apply(
            variables, prompts_BxP, positions, segment_ids, None, None, method="decode"
        )
    return logits, hidden, from_prefill(kv, prompt_lengths_B, max_len)


def extend(
    cfg: ModelConfig, variables: dict, tokens_BxT: jax.Array, cache: KVCache, *, absorbed=True
) -> tuple[jax.Array, jax.Array, KVCache]:
    """T new tokens per row after the cached ones: (logits [B, T, V], hidden, cache + T).

    absorbed=False rebuilds per-head K/V from the cache instead (the reference path).
    """
    T = tokens_BxT.shape[1]
    positions = cache.positions(T)
    check_inputs(cfg, tokens_BxT, positions)
    with axis_rules(cfg):
        logits, hidden, kv = Transformer(cfg, _decode_mode(absorbed)).apply(
            variables,
            tokens_BxT,
            positions,
            None,
            cache.layers,
            cache.mask(T),
            method="decode",
        )
    return logits, hidden, cache.write(kv)


def _first_mtp_module(variables: dict) -> dict:
    """Variables of MTP depth 1 alone (the scanned stack's first slice)."""
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)
    out = {"params": first(variables["params"][MTP])}
    if MTP in variables.get("router_bias", {}):
        out["router_bias"] = first(variables["router_bias"][MTP])
    return out


def _mtp(cfg, variables, mode, hidden, next_tokens, positions, segment_ids, cache, mask):
    if not cfg.mtp_depth:
        raise ValueError("this model has no MTP module (ModelConfig.mtp_depth = 0)")
    model = Transformer(cfg)
    with axis_rules(cfg):
        emb_BxTxD = model.apply(variables, next_tokens, method="embed_tokens")
        _, (normed_BxTxD, _, kv) = MTPModule(cfg, mode).apply(
            _first_mtp_module(variables), hidden, emb_BxTxD, positions, segment_ids, cache, mask
        )
        logits = model.apply(variables, normed_BxTxD, method="logits")
    return logits, {MTP: jax.tree.map(lambda a: a[None], kv)}


def mtp_prefill(
    cfg: ModelConfig,
    variables: dict,
    hidden_BxPxD: jax.Array,
    next_tokens_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
    max_len: int,
) -> tuple[jax.Array, KVCache]:
    """MTP depth 1 over a prefilled prompt: position i reads the main model's hidden state at i
    and the token at i + 1 (next_tokens; the last one is the first generated token).
    Returns its logits [B, P, V] (predicting token i + 2) and its own cache."""
    positions, segment_ids = _prompt_layout(hidden_BxPxD.shape[1], prompt_lengths_B)
    logits, kv = _mtp(
        cfg,
        variables,
        Mode.PREFILL,
        hidden_BxPxD,
        next_tokens_BxP,
        positions,
        segment_ids,
        None,
        None,
    )
    return logits, from_prefill(kv, prompt_lengths_B, max_len)


def mtp_extend(
    cfg: ModelConfig,
    variables: dict,
    hidden_BxTxD: jax.Array,
    next_tokens_BxT: jax.Array,
    cache: KVCache,
    *,
    absorbed=True,
) -> tuple[jax.Array, KVCache]:
    """MTP depth 1 at T new positions over its cache: (logits [B, T, V], cache + T)."""
    T = next_tokens_BxT.shape[1]
    logits, kv = _mtp(
        cfg,
        variables,
        _decode_mode(absorbed),
        hidden_BxTxD,
        next_tokens_BxT,
        cache.positions(T),
        None,
        jax.tree.map(lambda a: a[0], cache.layers[MTP]),
        cache.mask(T),
    )
    return logits, cache.write(kv)


__all__ = ["KVCache", "LayerKV", "extend", "mtp_extend", "mtp_prefill", "prefill"]
