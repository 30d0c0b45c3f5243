"""The grain pre-training pipeline: batch contract, determinism, resume, packing, splits."""

from __future__ import annotations

import dataclasses
import itertools
import json

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import model
from tests.conftest import tiny_config
from train import data, packing
from train.data import DataConfig
from train.sources import ArithmeticSource, StdlibSource
from train.splits import Split
from train.step import forward as step_forward
from train.tokenizer import train_bpe

SMALL = DataConfig(
    stdlib=StdlibSource(max_bytes=300_000),
    arithmetic=ArithmeticSource(train_count=3000, heldout_count=200),
    seq_len=64,
    batch_size=4,
)
ARITHMETIC_ONLY = dataclasses.replace(
    SMALL, stdlib=StdlibSource(weight=0.0), seq_len=256, batch_size=8
)
CONTRACT = {
    "inputs": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "loss_mask": np.float32,
}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(data.tokenizer_sample(SMALL, 200_000), 512)


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(it, n))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract(tok):
    (batch,) = _take(data.make_iterator(SMALL, tok, Split.TRAIN), 1)
    assert set(batch) == set(CONTRACT)
    for key, dtype in CONTRACT.items():
        assert batch[key].shape == (SMALL.batch_size, SMALL.seq_len), key
        assert batch[key].dtype == dtype, key
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_same_seed_same_batches_other_seed_differs(tok):
    a = _take(data.make_iterator(SMALL, tok, Split.TRAIN), 5)
    _assert_same(a, _take(data.make_iterator(SMALL, tok, Split.TRAIN), 5))
    other = _take(data.make_iterator(dataclasses.replace(SMALL, seed=1), tok, Split.TRAIN), 5)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])


def test_unmasked_positions_run_along_the_row(tok):
    # V3 packing: documents see each other, so RoPE positions are the row's, 0 .. L-1.
    cfg = ARITHMETIC_ONLY  # short documents: every row holds several
    for batch in _take(data.make_iterator(cfg, tok, Split.TRAIN), 3):
        assert (np.diff(batch["segment_ids"], axis=1) == 1).sum(1).min() >= 1
        rows = np.broadcast_to(np.arange(cfg.seq_len), batch["positions"].shape)
        np.testing.assert_array_equal(batch["positions"], rows)


def test_masked_segments_and_positions_restart_exactly_at_document_starts(tok):
    cfg = dataclasses.replace(SMALL, mask_documents=True)
    batches = _take(data.make_iterator(cfg, tok, Split.TRAIN), 20)
    starts = 0
    for batch in batches:
        seg, pos, inputs = batch["segment_ids"], batch["positions"], batch["inputs"]
        assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all()
        step = np.diff(seg, axis=1)
        assert np.isin(step, [0, 1]).all()  # documents numbered 1, 2, ... within a row
        new_doc = step == 1
        np.testing.assert_array_equal(pos[:, 1:] == 0, new_doc)
        np.testing.assert_array_equal(pos[:, 1:][~new_doc], pos[:, :-1][~new_doc] + 1)
        # A document starts right after the previous one's eos, and nowhere else.
        np.testing.assert_array_equal(inputs[:, :-1] == tok.eos_id, new_doc)
        starts += new_doc.sum()
    assert starts > 20  # the check saw many boundaries


def test_loss_mask_in_both_modes(tok):
    (plain,) = _take(data.make_iterator(SMALL, tok, Split.TRAIN), 1)
    assert (plain["loss_mask"] == 1).all()  # V3: documents are not masked from each other
    masked_cfg = dataclasses.replace(ARITHMETIC_ONLY, mask_documents=True)
    for batch in _take(data.make_iterator(masked_cfg, tok, Split.TRAIN), 5):
        # The only unpredictable targets are first tokens of a document: they follow an eos.
        assert (batch["loss_mask"] == 0).sum() > 10
        np.testing.assert_array_equal(batch["loss_mask"] == 0, batch["inputs"] == tok.eos_id)


def test_to_batch_on_hand_made_rows():
    rows = {
        "tokens": np.array([[5, 6, 1, 7, 8, 1, 0, 0]]),
        "tokens_segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0, 0]]),
        "tokens_positions": np.array([[3, 4, 5, 0, 1, 2, 0, 0]]),
    }
    plain = packing.to_batch(rows, mask_documents=False, pad_id=9)
    masked = packing.to_batch(rows, mask_documents=True, pad_id=9)
    np.testing.assert_array_equal(plain["inputs"], [[5, 6, 1, 7, 8, 1, 9]])
    np.testing.assert_array_equal(plain["targets"], [[6, 1, 7, 8, 1, 9, 9]])
    np.testing.assert_array_equal(plain["segment_ids"], [[1, 1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(plain["positions"], [[0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(masked["positions"], [[3, 4, 5, 0, 1, 2, 0]])
    np.testing.assert_array_equal(plain["loss_mask"], [[1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(masked["loss_mask"], [[1, 1, 0, 1, 1, 0, 0]])
    assert packing.packing_efficiency(plain) == pytest.approx(6 / 7)


@pytest.mark.parametrize("mask_documents", [False, True])
def test_a_packed_row_is_what_the_model_sees_unpacked(mask_documents):
    # Unmasked, the row is one sequence (positions and attention agree: the forward equals
    # the unpacked forward of the whole row); masked, each document is its own sequence.
    cfg = tiny_config(mtp_depth=0)
    variables = model.init(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, 13).astype(np.int32)
    rows = {
        "tokens": tokens[None],
        "tokens_segment_ids": np.array([[1] * 5 + [2] * 8], np.int32),
        "tokens_positions": np.array([list(range(5)) + list(range(8))], np.int32),
    }
    batch = packing.to_batch(rows, mask_documents=mask_documents)
    logits = step_forward(cfg, variables, batch, mask_documents).logits
    alone = lambda t: model.forward(cfg, variables, jnp.asarray(t)[None]).logits
    if mask_documents:
        chex.assert_trees_all_close(logits[:, :5], alone(tokens[:5]), atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(logits[:, 5:], alone(tokens[5:12]), atol=1e-5, rtol=1e-5)
    else:
        chex.assert_trees_all_close(logits, alone(tokens[:12]), atol=1e-5, rtol=1e-5)


def test_packing_efficiency_on_the_default_corpus(tok):
    cfg = DataConfig()  # stdlib + arithmetic, seq_len 256
    batches = _take(data.make_iterator(cfg, tok, Split.TRAIN), 10)
    real_targets = np.mean([b["loss_mask"].mean() for b in batches])
    assert real_targets >= 0.99
    assert np.mean([packing.packing_efficiency(b) for b in batches]) >= 0.99


def test_restored_iterator_yields_exactly_the_same_batches(tok, tmp_path):
    it = data.make_iterator(SMALL, tok, Split.TRAIN)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 6)
    fresh = data.make_iterator(SMALL, tok, Split.TRAIN)
    fresh.set_state(state)
    _assert_same(_take(fresh, 6), expected)

    # The same through orbax, as the train loop saves it.
    it = data.make_iterator(SMALL, tok, Split.TRAIN)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = _take(it, 4)
        fresh = data.make_iterator(SMALL, tok, Split.TRAIN)
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(_take(fresh, 4), expected)


def test_two_workers_give_the_in_process_batches_and_resume(tok):
    expected = _take(data.make_iterator(SMALL, tok, Split.TRAIN), 6)
    cfg = dataclasses.replace(SMALL, num_workers=2)
    it = data.make_iterator(cfg, tok, Split.TRAIN)
    first = _take(it, 3)
    state = it.get_state()
    _assert_same(first + _take(it, 3), expected)
    it.close()
    fresh = data.make_iterator(cfg, tok, Split.TRAIN)
    fresh.set_state(state)
    _assert_same(_take(fresh, 3), expected[3:])
    fresh.close()


def test_fim_sentinels_at_the_configured_rate(tok):
    cfg = ARITHMETIC_ONLY
    batches = _take(data.make_iterator(cfg, tok, Split.TRAIN), 30)
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    docs = int((targets == tok.eos_id).sum())
    fim_docs = int((targets == tok.fim_begin_id).sum())
    assert (targets == tok.fim_hole_id).sum() in (fim_docs - 1, fim_docs, fim_docs + 1)
    sd = np.sqrt(docs * cfg.fim_rate * (1 - cfg.fim_rate))
    assert docs > 500 and abs(fim_docs - docs * cfg.fim_rate) < 4 * sd + 1


def test_heldout_is_finite_deterministic_complete_and_disjoint(tok):
    batches = list(data.make_iterator(SMALL, tok, Split.HELDOUT))
    _assert_same(batches, list(data.make_iterator(SMALL, tok, Split.HELDOUT)))
    # Every held-out document exactly once: one eos per document. Each token of a row is a
    # target except the first, which is only an input.
    tokens = np.concatenate([np.c_[b["inputs"][:, :1], b["targets"]].ravel() for b in batches])
    heldout = [data.documents(s, Split.HELDOUT) for s in SMALL.sources()]
    assert (tokens == tok.eos_id).sum() == sum(map(len, heldout))
    # Padding only at the very end, with a static shape, carrying no loss.
    padded = [bool((b["segment_ids"] == 0).any()) for b in batches]
    assert padded[-1] and not any(padded[:-1])
    last = batches[-1]
    assert last["inputs"].shape == (SMALL.batch_size, SMALL.seq_len)
    assert (last["loss_mask"][last["segment_ids"] == 0] == 0).all()
    for source, held in zip(SMALL.sources(), heldout, strict=True):
        assert held and not set(held) & set(data.documents(source, Split.TRAIN))


def test_heldout_prefix_samples_every_source():
    docs = data.document_stream(SMALL, Split.HELDOUT)
    where = [i / len(docs) for i in range(len(docs)) if not docs[i].startswith("Question:")]
    assert len(where) > 5 and 0.2 < np.mean(where) < 0.8  # not all at the front


def test_mixture_weights_are_byte_fractions():
    docs = data.document_stream(SMALL, Split.TRAIN)
    sample = [docs[i] for i in range(4000)]
    arith = sum(len(d) for d in sample if d.startswith("Question:"))
    share = arith / sum(map(len, sample))
    assert abs(share - SMALL.arithmetic.weight) < 0.07, share


def test_shards_split_the_stream():
    full = data.document_stream(SMALL, Split.TRAIN)
    shards = [
        data.document_stream(SMALL, Split.TRAIN, shard_index=i, shard_count=2) for i in (0, 1)
    ]
    assert [shards[i % 2][i // 2] for i in range(10)] == [full[i] for i in range(10)]
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, 2\)"):
        data.document_stream(SMALL, Split.TRAIN, shard_index=2, shard_count=2)


def test_prepare_tokenizer_trains_once_then_loads(tmp_path):
    first = data.prepare_tokenizer(SMALL, tmp_path / "run", vocab_size=400, sample_bytes=50_000)
    assert (tmp_path / "run" / data.TOKENIZER_FILE).exists()
    again = data.prepare_tokenizer(SMALL, tmp_path / "run", vocab_size=999, sample_bytes=50_000)
    assert again.backend.to_str() == first.backend.to_str()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq_len": 0}, r"DataConfig.seq_len must be a positive int, got 0"),
        ({"num_workers": -1}, r"DataConfig.num_workers must be an int >= 0"),
        ({"fim_rate": 2.0}, r"DataConfig.fim_rate must be in \[0, 1\]"),
        (
            {"stdlib": StdlibSource(weight=0.0), "arithmetic": ArithmeticSource(weight=0.0)},
            r"every source has weight 0",
        ),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **changes)
