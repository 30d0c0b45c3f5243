"""SFT's loss: a packed row with sample masking computes what each conversation computes
alone, and the loss, normalised by the global count of trained tokens, gives the same value
and gradients however the batch is packed or split into micro-batches (on 8 devices:
tests/test_sharding_devices.py)."""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from tests.conftest import tiny_config
from train import packing
from train.chat import Message, Role, render
from train.optimizer import LRSchedule
from train.state import init_state
from train.step import LossConfig, forward, make_train_step, objective
from train.tokenizer import train_bpe

TEXT = "What is 12 + 34? 2 + 4 = 6, 1 + 3 = 4, so the answer is 46. Check: yes. " * 20
LOSS = LossConfig(mask_documents=True, balance_weight=0.0)  # per-row balance terms aside
SCHEDULE = LRSchedule(peak_lr=1.0, warmup_steps=0, final_lr=1.0)


def conversations(count: int, seed: int = 0) -> list[list[Message]]:
    """Conversations of varied lengths and turn counts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        a, b = (int(x) for x in rng.integers(1, 99, 2))
        turns = [Message(Role.USER, f"What is {a} + {b}?")]
        reasoning = " ".join(f"{a} + {b} = {a + b}." for _ in range(int(rng.integers(1, 4))))
        turns.append(Message(Role.ASSISTANT, str(a + b), reasoning=reasoning if i % 3 else None))
        if i % 4 == 1:
            turns += [Message(Role.USER, "Check?"), Message(Role.ASSISTANT, "Check: yes.")]
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 330)


def packed_batch(rendered, seq_len: int, bins: int, rows: int) -> dict:
    """The first-fit rows of `rendered` (the SFT pipeline's packing), padded to `rows` rows."""
    features = [
        {packing.TOKENS: r.ids, packing.TRAINED: r.trained.astype(np.int32)} for r in rendered
    ]
    ds = packing.pack_whole(grain.MapDataset.source(features).to_iter_dataset(), seq_len, bins)
    packed = list(ds)
    assert len(packed) <= rows, f"{len(packed)} rows do not fit in {rows}"
    batch = grain.experimental.batch_and_pad(packed, batch_size=rows)
    return {k: jnp.asarray(v) for k, v in packing.to_batch(batch, mask_documents=True).items()}


def alone_batch(rendered, seq_len: int, rows: int | None = None) -> dict:
    """Each conversation alone in its own row (then empty rows up to `rows`), padded after its
    end (causal attention: what follows a token never changes its logits)."""
    count = rows or len(rendered)
    rows = {name: np.zeros((count, seq_len + 1), np.int32) for name in ("ids", "trained")}
    for i, r in enumerate(rendered):
        rows["ids"][i, : len(r)] = r.ids
        rows["trained"][i, : len(r)] = r.trained
    return {
        "inputs": jnp.asarray(rows["ids"][:, :-1]),
        "targets": jnp.asarray(rows["ids"][:, 1:]),
        "segment_ids": jnp.ones((count, seq_len), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (count, seq_len)),
        "loss_mask": jnp.asarray(rows["trained"][:, 1:], jnp.float32),
    }


def sgd_gradients(cfg, loss_cfg, state, batch) -> tuple[dict, dict, dict]:
    """(metrics, gradients, router bias) of one train step: under SGD at learning rate 1 the
    update is minus the gradient."""
    step = jax.jit(make_train_step(cfg, loss_cfg, optax.sgd(1.0), SCHEDULE))
    new, metrics = step(state, batch)
    grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)
    return jax.device_get(metrics), jax.device_get(grads), jax.device_get(new.router_bias)


def max_diff(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in leaves)


def test_packed_rows_compute_each_conversation_alone(tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    rendered = [render(c, tokenizer) for c in conversations(7)]
    packed, alone = packed_batch(rendered, 63, bins=3, rows=8), alone_batch(rendered, 63, rows=8)
    assert int(packed["segment_ids"].max()) >= 2  # rows really hold several conversations
    variables = model.init(cfg, jax.random.key(0))
    logits_fn = jax.jit(
        lambda batch, mask: forward(cfg, variables, batch, mask).logits, static_argnums=1
    )
    logits, alone_logits = np.asarray(logits_fn(packed, True)), np.asarray(logits_fn(alone, False))
    found = 0
    for row, segments in enumerate(np.asarray(packed["segment_ids"])):
        for segment in set(segments.tolist()) - {0}:
            where = segments == segment
            ids = np.asarray(packed["inputs"][row])[where]
            (i,) = [i for i, r in enumerate(rendered) if np.array_equal(r.ids[: len(ids)], ids)]
            n = len(rendered[i]) - 1
            np.testing.assert_allclose(logits[row][where][:n], alone_logits[i, :n], atol=1e-5)
            found += 1
    assert found == len(rendered)

    # Both losses are sums over all trained tokens divided by their total count.
    def loss(params, batch):
        return objective(cfg, LOSS, {**variables, "params": params}, batch, 0)[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    want, want_grads = value_and_grad(variables["params"], alone)
    got, got_grads = value_and_grad(variables["params"], packed)
    print(f"packed vs alone: |loss diff| {abs(float(got - want)):.1e}, "
          f"max |grad diff| {max_diff(got_grads, want_grads):.1e}")  # fmt: skip
    assert abs(float(got - want)) < 1e-5
    assert max_diff(got_grads, want_grads) < 1e-5


def test_the_loss_does_not_change_with_how_conversations_are_packed(tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    rendered = [render(c, tokenizer) for c in conversations(9, seed=1)]
    variables = model.init(cfg, jax.random.key(1))
    loss = jax.jit(lambda batch: objective(cfg, LOSS, variables, batch, 0)[0])
    orders = {
        "in order": rendered,
        "reversed": rendered[::-1],
        "rotated": rendered[3:] + rendered[:3],
    }
    losses = [
        float(loss(packed_batch(order, 63, bins=bins, rows=8)))
        for order, bins in zip(orders.values(), (4, 1, 2), strict=True)
    ]
    print("loss under three packings:", losses)
    np.testing.assert_allclose(losses, losses[0], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def whole_batch(tokenizer):
    """(cfg, state, batch, one step's SGD outputs on the whole batch) for the micro-batch tests."""
    cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    rendered = [render(c, tokenizer) for c in conversations(10, seed=2)]
    batch = packed_batch(rendered, 63, bins=8, rows=8)
    counts = np.asarray(batch["loss_mask"]).sum(-1)
    assert counts.min() != counts.max()  # micro-batches hold different numbers of tokens
    state = init_state(cfg, optax.sgd(1.0), jax.random.key(2))
    return cfg, state, batch, sgd_gradients(cfg, WITH_BALANCE, state, batch)


WITH_BALANCE = LossConfig(mask_documents=True)  # the balance loss included: rows are equal


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_micro_batches_give_the_whole_batchs_loss_and_gradients(whole_batch, micro_batches):
    cfg, state, batch, want = whole_batch
    loss_cfg = dataclasses.replace(WITH_BALANCE, micro_batches=micro_batches)
    got = sgd_gradients(cfg, loss_cfg, state, batch)
    for name in ("loss", "ce", "mtp_loss", "balance_loss", "tokens", "trained_tokens", "grad_norm"):
        np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[0]["expert_load"], want[0]["expert_load"])
    print(f"{micro_batches} micro-batches: max |grad diff| {max_diff(got[1], want[1]):.1e}")
    assert max_diff(got[1], want[1]) < 1e-6
    assert max_diff(got[2], want[2]) == 0  # the bias moves on the whole batch's counts


def test_micro_batches_must_divide_the_batch(tokenizer):
    cfg = tiny_config()
    with pytest.raises(ValueError, match="micro_batches"):
        LossConfig(micro_batches=0)
    state = init_state(cfg, optax.sgd(1.0), jax.random.key(0))
    step = make_train_step(cfg, LossConfig(micro_batches=3), optax.sgd(1.0), SCHEDULE)
    batch = alone_batch([render(c, tokenizer) for c in conversations(4)], 63)
    batch = jax.tree.map(lambda x: x % cfg.vocab_size, batch)
    with pytest.raises(ValueError, match="micro_batches = 3 does not divide the 4 rows"):
        jax.jit(step)(state, batch)
