"""Behaviour of the full model: causality, remat, jit, packed segments, MTP, dtypes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import GroupedMatmul, RematPolicy
from model.transformer import Transformer

B, T = 2, 12
forward = jax.jit(model.forward, static_argnums=0)


def _tokens(cfg, seed=1, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@pytest.fixture
def variables(cfg):
    return model.init(cfg, jax.random.key(0))


def test_shapes_and_aux(cfg, variables):
    out = forward(cfg, variables, _tokens(cfg))
    chex.assert_shape(out.logits, (B, T, cfg.vocab_size))
    chex.assert_type(out.logits, jnp.float32)
    assert len(out.mtp_logits) == cfg.mtp_depth
    chex.assert_equal_shape([out.logits, *out.mtp_logits])
    counts = np.asarray(out.aux.expert_counts)
    assert counts.shape == (cfg.num_moe_layers, cfg.moe.num_experts)
    np.testing.assert_array_equal(counts.sum(-1), B * T * cfg.moe.top_k)
    assert out.aux.balance_loss.shape == (cfg.num_moe_layers,)
    assert np.asarray(out.aux.mtp_expert_counts).sum() == cfg.mtp_depth * B * T * cfg.moe.top_k
    assert "router_bias" in variables
    assert "bias" not in str(jax.tree_util.tree_structure(variables["params"]))


def _make_input_gradients(cfg):
    """d (logits of head `depth` at position t) / d embedded inputs [B, T, D], jitted once."""
    module = Transformer(cfg)

    @jax.jit
    def grads(variables, tokens, depth, t):
        positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)

        def f(p):
            logits, mtp, _, _ = module.apply(
                {**variables, "perturbations": p}, tokens, positions, None
            )
            heads = jnp.stack([logits, *mtp])
            return jax.lax.dynamic_index_in_dim(heads, depth, keepdims=False)[:, t].sum()

        return jax.grad(f)({"embedded": jnp.zeros((B, T, cfg.d_model))})["embedded"]

    return grads


def test_causality(cfg, variables):
    tokens = _tokens(cfg)
    grads = _make_input_gradients(cfg)
    for t in (0, 5, T - 1):
        for depth in range(cfg.mtp_depth + 1):
            # Head `depth` at position t reads tokens up to t + depth (MTP input embeddings).
            g = np.asarray(grads(variables, tokens, depth, t))
            assert np.all(g[:, t + depth + 1 :] == 0.0), (t, depth)
            assert np.abs(g[:, : t + 1]).sum() > 0


def test_remat_equals_no_remat(cfg, variables):
    tokens = _tokens(cfg)

    @jax.jit
    def value_and_grads(params, c):
        def loss(params):
            out = model.forward(c, {**variables, "params": params}, tokens)
            return out.logits.mean() + sum(m.mean() for m in out.mtp_logits)

        return jax.value_and_grad(loss)(params)

    value_and_grads = jax.jit(value_and_grads.__wrapped__, static_argnums=1)
    value, grads = value_and_grads(variables["params"], cfg)
    for policy in (RematPolicy.FULL, RematPolicy.DOTS):
        rvalue, rgrads = value_and_grads(variables["params"], cfg.replace(remat=policy))
        np.testing.assert_allclose(rvalue, value, rtol=1e-6)
        chex.assert_trees_all_close(rgrads, grads, atol=1e-6, rtol=1e-5)


def test_jit_equals_no_jit(cfg, variables):
    tokens = _tokens(cfg)
    eager = model.forward(cfg, variables, tokens)
    jitted = jax.jit(model.forward, static_argnums=0)(cfg, variables, tokens)
    chex.assert_trees_all_close(
        (jitted.logits, jitted.mtp_logits), (eager.logits, eager.mtp_logits), atol=1e-5, rtol=1e-5
    )


def test_packed_segments_do_not_attend_across_documents(cfg, variables):
    cfg = cfg.replace(mtp_depth=0)
    variables = model.init(cfg, jax.random.key(0))
    split = 5
    tokens = _tokens(cfg, shape=(1, T))
    segment_ids = jnp.array([[1] * split + [2] * (T - split)])
    positions = jnp.array([list(range(split)) + list(range(T - split))])
    packed = forward(cfg, variables, tokens, positions=positions, segment_ids=segment_ids)
    first = forward(cfg, variables, tokens[:, :split])
    second = forward(cfg, variables, tokens[:, split:])
    np.testing.assert_allclose(packed.logits[:, :split], first.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed.logits[:, split:], second.logits, atol=1e-5, rtol=1e-5)
    # Without segment ids the second document does see the first one.
    unmasked = forward(cfg, variables, tokens, positions=positions)
    assert np.abs(np.asarray(unmasked.logits[:, split:] - second.logits)).max() > 1e-3


def test_mtp_concatenates_embedding_then_hidden():
    # eh_proj's input is [enorm(emb(t_{i+1})); hnorm(h_i)] (DeepSeek's checkpoints; the
    # paper writes the hidden state first). Cutting one half of eh_proj at a time, the MTP
    # head must then ignore exactly the input that half carries.
    from tests.conftest import tiny_config

    cfg = tiny_config(mtp_depth=1)
    variables = model.init(cfg, jax.random.key(0))
    d = cfg.d_model
    tokens = _tokens(cfg, shape=(1, T))

    def mtp_logits(rows: slice, toks):
        params = variables["params"]
        mtp = params["mtp"]
        kernel = mtp["eh_proj"]["kernel"].at[:, rows].set(0.0)
        cut = {**params, "mtp": {**mtp, "eh_proj": {**mtp["eh_proj"], "kernel": kernel}}}
        return np.asarray(forward(cfg, {**variables, "params": cut}, toks).mtp_logits[0])

    hidden_only, embedding_only = slice(0, d), slice(d, 2 * d)  # the half that is cut
    # Hidden half cut: only embeddings of t_1.. reach the head, so t_0 (which changes every
    # hidden state) must not matter.
    new_first = tokens.at[0, 0].set((tokens[0, 0] + 1) % cfg.vocab_size)
    a, b = mtp_logits(embedding_only, tokens), mtp_logits(embedding_only, new_first)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # Embedding half cut: only hidden states reach the head, so the last token (whose
    # embedding position T-2 reads) must not matter before position T-1.
    new_last = tokens.at[0, T - 1].set((tokens[0, T - 1] + 1) % cfg.vocab_size)
    a, b = mtp_logits(hidden_only, tokens), mtp_logits(hidden_only, new_last)
    np.testing.assert_allclose(a[:, : T - 1], b[:, : T - 1], atol=1e-6)
    # Each half does carry its input: the checks above are not vacuous.
    a, b = mtp_logits(hidden_only, tokens), mtp_logits(hidden_only, new_first)
    assert np.abs(a - b).max() > 1e-3
    a, b = mtp_logits(embedding_only, tokens), mtp_logits(embedding_only, new_last)
    assert np.abs(a[:, T - 2] - b[:, T - 2]).max() > 1e-3


def test_grouped_matmul_backends_agree_in_the_model(cfg, variables):
    tokens = _tokens(cfg)
    outs = []
    for impl in (GroupedMatmul.TILED_SCAN, GroupedMatmul.RAGGED_DOT, GroupedMatmul.DENSE):
        c = cfg.replace(moe=cfg.moe.__class__(**{**cfg.moe.__dict__, "grouped_matmul": impl}))
        outs.append(forward(c, variables, tokens).logits)
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-5, rtol=1e-5)


def test_router_bias_steers_routing(cfg, variables):
    tokens = _tokens(cfg)
    bias = variables["router_bias"]["moe_layers"]["moe"]["router"]["bias"]
    boosted = bias.at[:, 0].set(10.0)  # every token now picks expert 0
    rb = {**variables["router_bias"]}
    rb["moe_layers"] = {"moe": {"router": {"bias": boosted}}}
    out = forward(cfg, {**variables, "router_bias": rb}, tokens)
    np.testing.assert_array_equal(np.asarray(out.aux.expert_counts)[:, 0], B * T)


def test_bfloat16_compute_runs_and_stays_close(cfg, variables):
    tokens = _tokens(cfg)
    f32 = np.asarray(forward(cfg, variables, tokens).logits)
    bf16 = forward(cfg.replace(dtype="bfloat16"), variables, tokens).logits
    assert bf16.dtype == jnp.float32
    # bf16 rounding can flip a few routing decisions; on average the logits stay close.
    assert np.abs(np.asarray(bf16) - f32).mean() < 0.05 * np.abs(f32).mean()


def test_forward_rejects_bad_token_rank(cfg, variables):
    with pytest.raises(ValueError, match="tokens"):
        model.forward(cfg, variables, jnp.zeros((T,), jnp.int32))


def test_logical_axes_name_every_weight():
    from jax.sharding import PartitionSpec as P

    from tests.conftest import tiny_config

    axes = model.logical_axes(tiny_config())
    params = axes["params"]
    assert params["moe_layers"]["moe"]["experts"]["wi_gate"] == P("layers", "exp", "embed", "mlp")
    assert params["moe_layers"]["attn"]["wkv_b"] == P("layers", "kv_lora", "heads", "kv")
    assert params["embed"]["embedding"] == P("vocab", "embed")
    assert params["mtp"]["eh_proj"]["kernel"] == P("mtp_layers", "mtp_concat", "embed")
    assert axes["router_bias"]["moe_layers"]["moe"]["router"]["bias"] == P("layers", "exp")
    # No mesh axis names inside model/: only logical names appear.
    names = {n for spec in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, P)) for n in spec}
    assert not names & {"data", "fsdp", "expert", "tensor"}


def test_program_size_does_not_grow_with_depth():
    from tests.conftest import tiny_config

    def size(num_layers):
        cfg = tiny_config(num_layers=num_layers)
        variables = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
        tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda v, t: model.forward(cfg, v, t))(variables, tokens)
        return len(str(jaxpr))

    # Layers are scanned: 3 and 12 layers trace to the same program (only shapes differ).
    assert abs(size(12) - size(3)) < 0.01 * size(3)
