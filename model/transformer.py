"""The DeepSeek-V3 decoder: scanned dense and MoE stacks, output head, MTP modules.

One module serves training (`__call__`), prefill and cached decode (`decode`); the `mode`
attribute (model.cache.Mode) picks the attention path, the parameters are the same.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from model.cache import LayerKV, Mode
from model.config import ModelConfig, RematPolicy
from model.gqa import GQA, KV
from model.layers import MLP, Linear, RMSNorm, partitioned_normal, project
from model.mla import MLA
from model.moe import MoE

BTD = ("activation_batch", "activation_length", "activation_embed")


@struct.dataclass
class Aux:
    """Routing statistics of the forward pass (None where the model has no such layers).

    expert_counts [L_moe, E]: token copies routed to each expert over the whole batch, per MoE
    layer (the input of the bias update). balance_loss [L_moe]: sequence-wise balance loss
    (unweighted, V3). batch_balance_loss [L_moe]: the same formula over the whole batch, the
    GShard/Switch auxiliary loss (for ablations). mtp_* are the same for the MTP blocks.
    """

    expert_counts: jax.Array | None
    balance_loss: jax.Array | None
    batch_balance_loss: jax.Array | None
    mtp_expert_counts: jax.Array | None
    mtp_balance_loss: jax.Array | None
    mtp_batch_balance_loss: jax.Array | None


class Block(nn.Module):
    """Pre-norm block: x + Attention(norm(x)), then + FFN(norm(.)) with a dense MLP or an MoE;
    the attention is MLA or GQA as the config says.

    Returns (x', (MoEAux or None, the attention's KV or None)).
    """

    cfg: ModelConfig
    use_moe: bool
    mode: Mode = Mode.TRAIN

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache=None, cache_mask=None):
        c = self.cfg
        norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
        if c.gqa is not None:
            attn = GQA(
                c.gqa, c.d_model, c.init_std, c.dtype, c.param_dtype, self.mode, c.fp8, name="attn"
            )
        else:
            attn = MLA(
                c.mla,
                c.d_model,
                c.norm_eps,
                c.init_std,
                c.dtype,
                c.param_dtype,
                self.mode,
                c.fp8,
                name="attn",
            )
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, BTD)
        attn_out, kv = attn(
            norm("attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT, cache, cache_mask
        )
        h_BxTxD = x_BxTxD + attn_out
        ffn_in = norm("ffn_norm")(h_BxTxD)
        if self.use_moe:
            moe = MoE(c.moe, c.init_std, c.dtype, c.param_dtype, c.fp8, name="moe")
            ffn_out, aux = moe(ffn_in)
        else:
            mlp = MLP(c.dense_dim, c.init_std, c.dtype, c.param_dtype, c.fp8, name="mlp")
            ffn_out = mlp(ffn_in)
            aux = None
        return nn.with_logical_constraint(h_BxTxD + ffn_out, BTD), (aux, kv)


def _remat(cls, policy: RematPolicy):
    if policy is RematPolicy.NONE:
        return cls
    checkpoint_policy = None
    if policy is RematPolicy.DOTS:
        checkpoint_policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(cls, policy=checkpoint_policy, prevent_cse=False)


def scan_blocks(cfg: ModelConfig, use_moe: bool, length: int, mode: Mode) -> nn.Module:
    """`length` blocks with stacked weights ('layers' axis), compiled once whatever the depth.

    Called as (x, positions, segment_ids, cache [L, ...] or None, cache_mask or None).
    """
    scanned = nn.scan(
        _remat(Block, cfg.remat),
        variable_axes={"params": 0, "router_bias": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, use_moe, mode)


class MTPModule(nn.Module):
    """One MTP depth: h' = Block(W [enorm(emb(t_{i+k})); hnorm(h)]).

    Returns (h', (norm(h'), MoEAux or None, latent KV or None)).
    """

    cfg: ModelConfig
    mode: Mode = Mode.TRAIN

    @nn.compact
    def __call__(self, h_BxTxD, emb_BxTxD, positions_BxT, segment_ids_BxT, cache=None, mask=None):
        c = self.cfg
        norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
        # Official checkpoints concatenate [embedding; hidden]; the order fixes eh_proj's layout.
        joined = jnp.concatenate([norm("enorm")(emb_BxTxD), norm("hnorm")(h_BxTxD)], axis=-1)
        proj = Linear(
            c.d_model, ("mtp_concat", "embed"), c.init_std, c.dtype, c.param_dtype, name="eh_proj"
        )
        block = _remat(Block, c.remat)(c, c.mtp_uses_moe, self.mode, name="block")
        h_BxTxD, (aux, kv) = block(proj(joined), positions_BxT, segment_ids_BxT, cache, mask)
        return h_BxTxD, (norm("final_norm")(h_BxTxD), aux, kv)


STACKS = ("dense_layers", "moe_layers")


class Transformer(nn.Module):
    """tokens [B, T] -> (main logits, per-depth MTP logits, final hidden, Aux)."""

    cfg: ModelConfig
    mode: Mode = Mode.TRAIN

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=partitioned_normal(c.init_std, ("vocab", "embed")),
        )
        if not c.tie_embeddings:
            self.lm_head = Linear(
                c.vocab_size, ("embed", "vocab"), c.init_std, c.dtype, c.param_dtype
            )
        self.final_norm = RMSNorm(c.norm_eps, c.dtype, c.param_dtype)
        if c.num_dense_layers:
            self.dense_layers = scan_blocks(c, False, c.num_dense_layers, self.mode)
        if c.num_moe_layers:
            self.moe_layers = scan_blocks(c, True, c.num_moe_layers, self.mode)
        if c.mtp_depth:
            self.mtp = nn.scan(
                MTPModule,
                variable_axes={"params": 0, "router_bias": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=c.mtp_depth,
                metadata_params={nn.PARTITION_NAME: "mtp_layers"},
            )(c, self.mode)

    def stack_names(self) -> tuple[str, ...]:
        """The scanned stacks this config has, in order."""
        sizes = (self.cfg.num_dense_layers, self.cfg.num_moe_layers)
        return tuple(name for name, n in zip(STACKS, sizes, strict=True) if n)

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        return self.embed(tokens_BxT)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Output head in float32 over final-normed hidden states (the embedding's transpose
        when tied)."""
        if self.cfg.tie_embeddings:
            table = jnp.asarray(self.embed.embedding, self.cfg.dtype)
            out = project(hidden_BxTxD.astype(self.cfg.dtype), table.T).astype(jnp.float32)
        else:
            out = self.lm_head(hidden_BxTxD).astype(jnp.float32)
        return nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_vocab")
        )

    def _stacks(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache, cache_mask):
        """Runs the stacks; returns (x, MoE aux or None, {stack: latent KV [L, ...] or None})."""
        moe_aux, kv = None, {}
        for name in self.stack_names():
            layer_cache = None if cache is None else cache[name]
            x_BxTxD, (aux, kv[name]) = getattr(self, name)(
                x_BxTxD, positions_BxT, segment_ids_BxT, layer_cache, cache_mask
            )
            if name == "moe_layers":
                moe_aux = aux
        return x_BxTxD, moe_aux, kv

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        c = self.cfg
        # A zero-valued hook so tests can take gradients with respect to the embedded inputs.
        x_BxTxD = self.perturb("embedded", self.embed(tokens_BxT))
        x_BxTxD, moe_aux, _ = self._stacks(x_BxTxD, positions_BxT, segment_ids_BxT, None, None)
        hidden_BxTxD = self.final_norm(x_BxTxD)

        mtp_logits, mtp_aux = (), None
        if c.mtp_depth:
            # Depth k reads the embedding of token i + k; the last k positions see padding (0)
            # and have no target, so their MTP logits are meaningless and must be masked.
            T = tokens_BxT.shape[1]
            padded = jnp.pad(tokens_BxT, ((0, 0), (0, c.mtp_depth)))
            shifted_PxBxT = jnp.stack([padded[:, k : k + T] for k in range(1, c.mtp_depth + 1)])
            # Depth 1 reads the main model's final-normed hidden state, as DeepSeek's weights are
            # served (vLLM / SGLang); deeper depths chain the previous MTP block's output.
            _, (mtp_hidden, mtp_aux, _) = self.mtp(
                hidden_BxTxD, self.embed(shifted_PxBxT), positions_BxT, segment_ids_BxT
            )
            mtp_logits = tuple(self.logits(mtp_hidden[k]) for k in range(c.mtp_depth))
        fields = ("expert_counts", "balance_loss", "batch_balance_loss")
        aux = Aux(
            *(getattr(moe_aux, f) if moe_aux is not None else None for f in fields),
            *(getattr(mtp_aux, f) if mtp_aux is not None else None for f in fields),
        )
        return self.logits(hidden_BxTxD), mtp_logits, hidden_BxTxD, aux

    def decode(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array | None,
        cache: dict[str, LayerKV | KV] | None,
        cache_mask_BxTxS: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, dict[str, LayerKV | KV]]:
        """(logits [B, T, V], final hidden [B, T, D], {stack: KV of the T tokens}).

        PREFILL: a full (left-padded) prompt, no cache. DECODE*: new tokens over the cache.
        """
        x_BxTxD = self.embed(tokens_BxT)
        x_BxTxD, _, kv = self._stacks(
            x_BxTxD, positions_BxT, segment_ids_BxT, cache, cache_mask_BxTxS
        )
        hidden_BxTxD = self.final_norm(x_BxTxD)
        return self.logits(hidden_BxTxD), hidden_BxTxD, kv
