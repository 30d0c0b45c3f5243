"""The KV cache (MLA's latents or GQA's keys and values), and the modes the model runs in.

Per token per MLA layer the cache holds only what absorbed decode reads (PAPER_FACTS.md): the
normalized latent c_kv [kv_lora] and the rotated shared RoPE key k_pe [rope]; a GQA layer
(model/gqa.py) holds its rotated keys and values [kv_heads, head_dim] each. Rows are
left-padded: row b's tokens occupy slots start[b] .. length[b] - 1, and token position is
slot - start[b], so prompts of different lengths decode in one batch with the same RoPE
positions they would have alone.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from model.config import ModelConfig


class Mode(enum.Enum):
    """What a forward pass computes and returns."""

    TRAIN = "train"  # full sequences, no cache
    PREFILL = "prefill"  # full sequences; also returns every position's latent KV
    DECODE = "decode"  # new tokens attend over a cache with absorbed MLA weights
    DECODE_EXPANDED = "decode_expanded"  # same, rebuilding per-head K/V (the reference)


@struct.dataclass
class LayerKV:
    """Latent KV of one layer (or a stack: a leading layer axis): c_kv [.., B, S, kv_lora]
    normalized, k_pe [.., B, S, rope] rotated."""

    c_kv: jax.Array
    k_pe: jax.Array


@struct.dataclass
class KVCache:
    """Caches of the scanned stacks ({stack name: LayerKV or gqa.KV, arrays [L, B, S, ...]}):
    and, per row,
    start [B] (first real slot; earlier slots are padding) and length [B] (slots written; the
    next token goes to slot length)."""

    layers: dict
    start: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.layers)[0].shape[2]

    def positions(self, num_new: int) -> jax.Array:
        """RoPE positions [B, num_new] of the next num_new tokens."""
        offsets = jnp.arange(num_new, dtype=jnp.int32)
        return (self.length - self.start)[:, None] + offsets

    def mask(self, num_new: int) -> jax.Array:
        """[B, num_new, S]: the cached slots every new token may attend to."""
        slots = jnp.arange(self.max_len, dtype=jnp.int32)
        valid_BxS = (slots >= self.start[:, None]) & (slots < self.length[:, None])
        return jnp.broadcast_to(valid_BxS[:, None], (valid_BxS.shape[0], num_new, self.max_len))

    def write(self, new: dict[str, LayerKV]) -> KVCache:
        """Store T new entries per row (arrays [L, B, T, ...]) at slots length.., length += T.

        Writes past the end of the cache are dropped; generate sizes the cache so that no
        token it keeps is ever dropped.
        """
        B, T = jax.tree.leaves(new)[0].shape[1:3]
        rows_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        slots_BxT = self.length[:, None] + jnp.arange(T, dtype=jnp.int32)

        def put(cache_LxBxSxC, new_LxBxTxC):
            return cache_LxBxSxC.at[:, rows_BxT, slots_BxT].set(new_LxBxTxC, mode="drop")

        layers = {name: jax.tree.map(put, self.layers[name], kv) for name, kv in new.items()}
        return self.replace(layers=layers, length=self.length + T)

    def rewind(self, length: jax.Array) -> KVCache:
        """Forget slots >= length [B] (rejected speculative tokens); they are overwritten later."""
        return self.replace(length=jnp.asarray(length, jnp.int32))


def from_prefill(new: dict, prompt_lengths: jax.Array, max_len: int) -> KVCache:
    """A cache of max_len slots holding a left-padded prefill (arrays [L, B, P, ...])."""
    P = jax.tree.leaves(new)[0].shape[2]
    if max_len < P:
        raise ValueError(f"prompt length {P} exceeds the cache length {max_len}")

    def pad(a_LxBxPx_):
        return jnp.pad(
            a_LxBxPx_, ((0, 0), (0, 0), (0, max_len - P)) + ((0, 0),) * (a_LxBxPx_.ndim - 3)
        )

    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    return KVCache(
        layers={name: jax.tree.map(pad, kv) for name, kv in new.items()},
        start=P - lengths,
        length=jnp.full_like(lengths, P),
    )


def cache_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes the cache holds per token over all main layers (in cfg.dtype)."""
    if cfg.gqa is not None:
        per_layer = 2 * cfg.gqa.num_kv_heads * cfg.gqa.head_dim
    else:
        per_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    return per_layer * cfg.num_layers * np.dtype(jnp.dtype(cfg.dtype)).itemsize


def mha_cache_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes per token of a standard MHA cache with the same heads: K [nope + rope] and V."""
    if cfg.gqa is not None:
        per_layer = 2 * cfg.gqa.num_heads * cfg.gqa.head_dim
    else:
        per_layer = cfg.mla.num_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)
    return per_layer * cfg.num_layers * np.dtype(jnp.dtype(cfg.dtype)).itemsize
