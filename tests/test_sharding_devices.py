"""Sharded runs compute what a single device computes (run on 8 forced host devices by
tests/test_sharding.py; skipped in a process with fewer devices)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.config import GQAConfig, ModelConfig
from sharding.mesh import ParallelConfig, make_parallel
from sharding.partition import global_batch
from sharding.rules import Rules
from tests.conftest import tiny_config
from train.checkpoint import Checkpointer
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.packing import TOKENS, to_batch
from train.sharded_state import init_state_sharded
from train.step import LossConfig, make_train_step, objective

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: run through tests/test_sharding.py"
)

CFG = tiny_config(d_model=64, vocab_size=128)
B, L, STEPS = 8, 16, 3
SCHEDULE = LRSchedule(peak_lr=1e-2, warmup_steps=1)
OPTIMIZER = make_optimizer(OptimizerConfig(schedule=SCHEDULE))
PRESETS = {
    "data": ParallelConfig(data=8, rules=Rules.DATA),
    "fsdp": ParallelConfig(rules=Rules.FSDP),
    "fsdp_ep": ParallelConfig(fsdp=2, expert=4, rules=Rules.FSDP_EP),
    "fsdp_ep_tp": ParallelConfig(fsdp=2, expert=2, tensor=2, rules=Rules.FSDP_EP_TP),
}


def _batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        tokens = rng.integers(0, CFG.vocab_size, (B, L + 1), np.int32)
        rows = {
            TOKENS: tokens,
            f"{TOKENS}_segment_ids": np.ones_like(tokens),
            f"{TOKENS}_positions": np.broadcast_to(np.arange(L + 1, dtype=np.int32), tokens.shape),
        }
        yield to_batch(rows, mask_documents=False)


def _single_device():
    return make_parallel(ParallelConfig(fsdp=1), devices=jax.devices()[:1])


def _run(parallel, base_cfg=CFG):
    """(per-step losses, step-0 gradients, final state) of STEPS train steps."""
    cfg = parallel.configure(base_cfg)
    state, shardings = init_state_sharded(cfg, OPTIMIZER, jax.random.key(0), parallel)
    step = jax.jit(
        make_train_step(cfg, LossConfig(), OPTIMIZER, SCHEDULE),
        in_shardings=(shardings, parallel.batch_sharding()),
        out_shardings=(shardings, parallel.replicated()),
    )

    @jax.jit
    def grads(params, router_bias, batch):
        loss = lambda p: objective(
            cfg, LossConfig(), {"params": p, "router_bias": router_bias}, batch, 0
        )[0]
        return jax.grad(loss)(params)

    losses, first_grads = [], None
    with parallel.activate():
        for batch in _batches():
            batch = global_batch(parallel, batch)
            if first_grads is None:
                first_grads = jax.device_get(grads(state.params, state.router_bias, batch))
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, first_grads, state


@functools.cache
def _reference(base_cfg=CFG):
    return _run(_single_device(), base_cfg)


# A dense GQA student (Qwen2-style: biases, tied head): 4 query heads over 2 KV heads.
DENSE = ModelConfig(
    vocab_size=128, d_model=64, num_layers=2, num_dense_layers=2, dense_dim=96, mla=None,
    moe=None, gqa=GQAConfig(4, 2, 16, qkv_bias=True), tie_embeddings=True, max_seq_len=64,
    init_std=0.2,
)  # fmt: skip


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_ep_tp"])
def test_a_dense_student_on_8_devices_equals_one_device(preset):
    want_losses, want_grads, _ = _reference(DENSE)
    losses, grads, state = _run(make_parallel(PRESETS[preset]), DENSE)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    if preset == "fsdp_ep_tp":  # K/V heads split over `tensor` like the query heads
        assert _spec(state, "dense_layers", "attn", "wk") == (None, "fsdp", "tensor", None)
        assert _spec(state, "dense_layers", "attn", "wq") == (None, "fsdp", "tensor", None)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_losses_and_gradients_equal_one_device(preset):
    want_losses, want_grads, want_state = _reference()
    losses, grads, state = _run(make_parallel(PRESETS[preset]))
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
    worst = max(
        float(np.abs(g - w).max())
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True)
    )
    print(
        f"{preset}: max |loss diff| {np.abs(np.subtract(losses, want_losses)).max():.2e}, "
        f"max |grad diff| {worst:.2e}"
    )
    assert worst < 1e-5
    bias = jax.device_get(state.router_bias)
    want_bias = jax.device_get(want_state.router_bias)
    for a, b in zip(jax.tree.leaves(bias), jax.tree.leaves(want_bias), strict=True):
        np.testing.assert_array_equal(a, b)  # same global expert counts on every layout


def _spec(state, *path):
    leaf = state.params
    for key in path:
        leaf = leaf[key]
    return tuple(leaf.sharding.spec)


def test_parameter_shardings_follow_the_rules():
    by_preset = {}
    for name, cfg in PRESETS.items():
        state, _ = init_state_sharded(CFG, OPTIMIZER, jax.random.key(0), make_parallel(cfg))
        by_preset[name] = state
    experts = ("moe_layers", "moe", "experts", "wi_gate")  # [layers, exp, embed, mlp]
    assert all(a is None for a in _spec(by_preset["data"], *experts))
    assert _spec(by_preset["fsdp"], *experts) == (None, None, "fsdp", None)
    assert _spec(by_preset["fsdp_ep"], *experts) == (None, "expert", "fsdp", None)
    assert _spec(by_preset["fsdp_ep_tp"], *experts) == (None, "expert", "fsdp", "tensor")
    heads = ("dense_layers", "attn", "wo")  # [layers, heads, kv, embed]
    assert _spec(by_preset["fsdp_ep_tp"], *heads) == (None, "tensor", None, "fsdp")
    # Adam moments are sharded like their parameters.
    mu = by_preset["fsdp_ep"].opt_state[1][0].mu["moe_layers"]["moe"]["experts"]["wi_gate"]
    assert tuple(mu.sharding.spec) == (None, "expert", "fsdp", None)
    # Each device holds 1/8 of the expert weights under fsdp x expert = 2 x 4.
    w = by_preset["fsdp_ep"].params["moe_layers"]["moe"]["experts"]["wi_gate"]
    assert w.addressable_shards[0].data.size * 8 == w.size


def test_expert_parallel_follows_the_configs_rules_not_the_context():
    """The rules are ModelConfig.logical_rules (static: jit keys on them). One jitted step
    traced with the mesh's rules sends tokens to their experts (all-to-all); the same call
    with a config without rules retraces and keeps experts whole; flax's ambient
    nn.logical_axis_rules are refused rather than silently followed or ignored."""
    import flax.linen as nn

    parallel = make_parallel(PRESETS["fsdp_ep"])
    state, _ = init_state_sharded(CFG, OPTIMIZER, jax.random.key(0), parallel)

    @functools.partial(jax.jit, static_argnums=0)
    def step(cfg, state, batch):
        return make_train_step(cfg, LossConfig(), OPTIMIZER, SCHEDULE)(state, batch)

    with parallel.activate():
        batch = global_batch(parallel, next(_batches()))
        texts = [step.lower(cfg, state, batch).as_text() for cfg in (parallel.configure(CFG), CFG)]
        fresh = jax.jit(make_train_step(CFG, LossConfig(), OPTIMIZER, SCHEDULE))
        rules = nn.logical_axis_rules(parallel.logical_rules)
        with rules, pytest.raises(ValueError, match="logical_rules"):
            fresh.lower(state, batch)
    assert "all_to_all" in texts[0] and "all_to_all" not in texts[1]


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    saved_on = make_parallel(ParallelConfig(fsdp=2, expert=4, rules=Rules.FSDP_EP))
    state, _ = init_state_sharded(CFG, OPTIMIZER, jax.random.key(3), saved_on)
    checkpointer = Checkpointer(tmp_path, every=1, keep=1)
    checkpointer.save(state, None, {})
    checkpointer.wait()
    want = jax.device_get(state.params)
    for target in (make_parallel(ParallelConfig(fsdp=8)), _single_device()):
        like, _ = init_state_sharded(CFG, OPTIMIZER, jax.random.key(0), target)
        restored, _, _ = checkpointer.restore_latest(like, None)
        leaf = restored.params["moe_layers"]["moe"]["experts"]["wi_gate"]
        assert leaf.sharding.mesh.shape == target.mesh.shape
        for a, b in zip(
            jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(want), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    checkpointer.close()


def test_generation_under_a_mesh_equals_one_device():
    variables = model.init(CFG, jax.random.key(0))
    prompts = [[3, 14, 15, 92, 65, 35], [2, 71]] * 4
    want = model.generate(CFG, variables, prompts, max_new_tokens=6, temperature=0)
    parallel = make_parallel(PRESETS["fsdp_ep"])
    from sharding.partition import variable_shardings

    sharded = jax.device_put(variables, variable_shardings(CFG, parallel))
    with parallel.activate():
        cfg = parallel.configure(CFG)
        got = model.generate(cfg, sharded, prompts, max_new_tokens=6, temperature=0)
    assert got.completions() == want.completions()


@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged"])
@pytest.mark.parametrize("routing", ["random", "all-to-one-device"])
def test_expert_parallel_dispatch_equals_reference(ragged, routing):
    """Values and gradients of the EP layer against the loop-over-experts reference; the
    ragged path runs over the CPU emulation of ragged_all_to_all (its offsets are checked)."""
    from model.config import EPExchange, GroupedMatmul, MoEConfig
    from model.expert_parallel import routed_experts_ep
    from model.moe import routed_experts, routed_experts_reference

    N, D, F, E, K = 64, 16, 12, 8, 2
    keys = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(keys[0], (N, D))
    if routing == "random":
        experts = jnp.argsort(jax.random.uniform(keys[1], (N, E)), axis=-1)[:, :K]
    else:  # every copy goes to experts 0 and 1, both on the first expert device
        experts = jnp.broadcast_to(jnp.arange(K), (N, K))
    weights = jax.random.uniform(keys[2], (N, K))
    w = {
        "wi_gate": jax.random.normal(keys[3], (E, D, F)) * 0.3,
        "wi_up": jax.random.normal(keys[4], (E, D, F)) * 0.3,
        "wo": jax.random.normal(keys[0], (E, F, D)) * 0.3,
    }
    local = functools.partial(
        routed_experts, cfg=MoEConfig(E, 0, K, F, grouped_matmul=GroupedMatmul.DENSE)
    )
    parallel = make_parallel(PRESETS["fsdp_ep"])

    def loss(fn, x, weights, w):
        return jnp.sum(jnp.sin(fn(x, experts, weights, w)))

    def ep(x, experts, weights, w):
        exchange = EPExchange.RAGGED_ALL_TO_ALL if ragged else EPExchange.ALL_TO_ALL
        return routed_experts_ep(x, experts, weights, w, local, "expert", exchange)

    want = routed_experts_reference(x, experts, weights, w)
    want_grads = jax.grad(functools.partial(loss, routed_experts_reference), (0, 1, 2))(
        x, weights, w
    )
    with parallel.activate():
        got = jax.jit(ep)(x, experts, weights, w)
        grads = jax.jit(jax.grad(functools.partial(loss, ep), (0, 1, 2)))(x, weights, w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5)


def test_sft_loss_and_gradients_on_8_devices_with_micro_batches_equal_one_device():
    """The SFT loss is normalised by the global count of trained tokens: the same packed
    batch on 8 devices, whole or as 2 micro-batches, gives one device's loss and gradients."""
    import optax

    from tests.test_sft_loss import SCHEDULE, TEXT, conversations, max_diff, packed_batch
    from train.chat import render
    from train.tokenizer import train_bpe

    tokenizer = train_bpe([TEXT], 330)
    batch = packed_batch([render(c, tokenizer) for c in conversations(10, seed=2)], 63, 8, 8)
    batch = jax.device_get(batch)
    sgd = optax.sgd(1.0)

    def one_step(parallel, micro_batches):
        cfg = parallel.configure(tiny_config(vocab_size=tokenizer.vocab_size))
        state, shardings = init_state_sharded(cfg, sgd, jax.random.key(2), parallel)
        loss_cfg = LossConfig(mask_documents=True, micro_batches=micro_batches)
        step = jax.jit(
            make_train_step(cfg, loss_cfg, sgd, SCHEDULE),
            in_shardings=(shardings, parallel.batch_sharding()),
            out_shardings=(shardings, parallel.replicated()),
        )
        with parallel.activate():
            new, metrics = step(state, global_batch(parallel, batch))
        grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)
        return float(metrics["loss"]), jax.device_get(grads)

    want_loss, want_grads = one_step(_single_device(), 1)
    for micro_batches in (1, 2):
        loss, grads = one_step(make_parallel(PRESETS["fsdp"]), micro_batches)
        print(f"8 devices, {micro_batches} micro-batches: |loss diff| {abs(loss - want_loss):.1e}, "
              f"max |grad diff| {max_diff(grads, want_grads):.1e}")  # fmt: skip
        assert abs(loss - want_loss) < 1e-6 * abs(want_loss)
        assert max_diff(grads, want_grads) < 1e-6
