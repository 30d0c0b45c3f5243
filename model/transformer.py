"""The DeepSeek-V3 decoder: scanned dense and MoE stacks, output head, MTP modules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from model.config import ModelConfig, RematPolicy
from model.layers import MLP, Linear, RMSNorm, partitioned_normal
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
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(.)) with a dense MLP or an MoE."""

    cfg: ModelConfig
    use_moe: bool

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        c = self.cfg
        norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
        attn = MLA(c.mla, c.d_model, c.norm_eps, c.init_std, c.dtype, c.param_dtype, name="attn")
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, BTD)
        h_BxTxD = x_BxTxD + attn(norm("attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT)
        ffn_in = norm("ffn_norm")(h_BxTxD)
        if self.use_moe:
            ffn_out, aux = MoE(c.moe, c.init_std, c.dtype, c.param_dtype, name="moe")(ffn_in)
        else:
            ffn_out = MLP(c.dense_dim, c.init_std, c.dtype, c.param_dtype, name="mlp")(ffn_in)
            aux = None
        return nn.with_logical_constraint(h_BxTxD + ffn_out, BTD), aux


def _remat(cls, policy: RematPolicy):
    if policy is RematPolicy.NONE:
        return cls
    checkpoint_policy = None
    if policy is RematPolicy.DOTS:
        checkpoint_policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(cls, policy=checkpoint_policy, prevent_cse=False)


def scan_blocks(cfg: ModelConfig, use_moe: bool, length: int, name: str) -> nn.Module:
    """`length` blocks with stacked weights ('layers' axis), compiled once whatever the depth."""
    scanned = nn.scan(
        _remat(Block, cfg.remat),
        variable_axes={"params": 0, "router_bias": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, use_moe, name=name)


class MTPModule(nn.Module):
    """One MTP depth: h' = Block(W [enorm(emb(t_{i+k})); hnorm(h)]), returns (h', norm(h'))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD, emb_BxTxD, positions_BxT, segment_ids_BxT):
        c = self.cfg
        norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
        # Official checkpoints concatenate [embedding; hidden]; the order fixes eh_proj's layout.
        joined = jnp.concatenate([norm("enorm")(emb_BxTxD), norm("hnorm")(h_BxTxD)], axis=-1)
        proj = Linear(
            c.d_model, ("mtp_concat", "embed"), c.init_std, c.dtype, c.param_dtype, name="eh_proj"
        )
        block = _remat(Block, c.remat)(c, c.mtp_uses_moe, name="block")
        h_BxTxD, aux = block(proj(joined), positions_BxT, segment_ids_BxT)
        return h_BxTxD, (norm("final_norm")(h_BxTxD), aux)


class Transformer(nn.Module):
    """tokens [B, T] -> (main logits, per-depth MTP logits, final hidden, Aux)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        c = self.cfg
        embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=partitioned_normal(c.init_std, ("vocab", "embed")),
            name="embed",
        )
        head = Linear(
            c.vocab_size, ("embed", "vocab"), c.init_std, c.dtype, c.param_dtype, name="lm_head"
        )
        final_norm = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="final_norm")

        def logits(h):
            out = head(h).astype(jnp.float32)
            return nn.with_logical_constraint(
                out, ("activation_batch", "activation_length", "activation_vocab")
            )

        # A zero-valued hook so tests can take gradients with respect to the embedded inputs.
        x_BxTxD = self.perturb("embedded", embed(tokens_BxT))
        if c.num_dense_layers:
            stack = scan_blocks(c, False, c.num_dense_layers, "dense_layers")
            x_BxTxD, _ = stack(x_BxTxD, positions_BxT, segment_ids_BxT)
        moe_aux = mtp_aux = None
        if c.num_moe_layers:
            stack = scan_blocks(c, True, c.num_moe_layers, "moe_layers")
            x_BxTxD, moe_aux = stack(x_BxTxD, positions_BxT, segment_ids_BxT)
        hidden_BxTxD = final_norm(x_BxTxD)

        mtp_logits = ()
        if c.mtp_depth:
            # Depth k reads the embedding of token i + k; the last k positions see padding (0)
            # and have no target, so their MTP logits are meaningless and must be masked.
            T = tokens_BxT.shape[1]
            padded = jnp.pad(tokens_BxT, ((0, 0), (0, c.mtp_depth)))
            shifted_PxBxT = jnp.stack([padded[:, k : k + T] for k in range(1, c.mtp_depth + 1)])
            mtp = nn.scan(
                MTPModule,
                variable_axes={"params": 0, "router_bias": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=c.mtp_depth,
                metadata_params={nn.PARTITION_NAME: "mtp_layers"},
            )(c, name="mtp")
            # Depth 1 reads the main model's final-normed hidden state, as DeepSeek's weights are
            # served (vLLM / SGLang); deeper depths chain the previous MTP block's output.
            _, (mtp_hidden, mtp_aux) = mtp(
                hidden_BxTxD, embed(shifted_PxBxT), positions_BxT, segment_ids_BxT
            )
            mtp_logits = tuple(logits(mtp_hidden[k]) for k in range(c.mtp_depth))
        fields = ("expert_counts", "balance_loss", "batch_balance_loss")
        aux = Aux(
            *(getattr(moe_aux, f) if moe_aux is not None else None for f in fields),
            *(getattr(mtp_aux, f) if mtp_aux is not None else None for f in fields),
        )
        return logits(hidden_BxTxD), mtp_logits, hidden_BxTxD, aux
