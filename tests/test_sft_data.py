"""The SFT input pipeline: split, over-long policy (counted), whole conversations per row with
restarted positions and assistant-only targets, and a checkpointable iterator."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.test_sft_loss import TEXT, conversations
from train.chat import Message, Role, render
from train.conversations import BadData
from train.sft_data import OverLong, SFTDataConfig, make_iterator, prepare, rows_per_epoch
from train.splits import Split
from train.tokenizer import train_bpe

CFG = SFTDataConfig(seq_len=63, batch_size=4, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 330)


def _long(words: int) -> list[Message]:
    """A short prompt and an answer of `words` words."""
    return [Message(Role.USER, "go"), Message(Role.ASSISTANT, "ok " * words)]


def test_over_long_conversations_are_truncated_or_dropped_and_counted(tokenizer):
    long_prompt = [Message(Role.USER, "go " * 80), Message(Role.ASSISTANT, "x")]
    data = [*conversations(40), _long(40), _long(50), long_prompt]
    truncated = prepare(CFG, tokenizer, data)
    assert truncated.stats["truncated"] == 2
    assert truncated.stats["dropped_untrained"] == 1  # its prompt alone fills the row
    assert all(len(r) <= CFG.seq_len + 1 for r in truncated.train + truncated.heldout)
    dropped = prepare(dataclasses.replace(CFG, over_long=OverLong.DROP), tokenizer, data)
    assert dropped.stats["dropped_over_long"] == 3 and dropped.stats["truncated"] == 0
    kept = len(dropped.train) + len(dropped.heldout)
    assert kept == 40 and dropped.stats["train_conversations"] == len(dropped.train)


def test_the_split_is_by_content_and_disjoint(tokenizer):
    data = conversations(60)
    a, b = prepare(CFG, tokenizer, data), prepare(CFG, tokenizer, data[::-1])
    as_set = lambda items: {tuple(r.ids.tolist()) for r in items}
    assert as_set(a.heldout) == as_set(b.heldout) and as_set(a.train) == as_set(b.train)
    assert not as_set(a.heldout) & as_set(a.train)
    assert a.stats["heldout_conversations"] > 0


def test_rows_hold_whole_conversations_with_restarted_positions(tokenizer):
    data = prepare(CFG, tokenizer, conversations(60))
    whole = {tuple(r.ids.tolist()): r for r in data.train}
    it = make_iterator(CFG, data, tokenizer, Split.TRAIN)
    seen = 0
    for _ in range(6):
        batch = next(it)
        for row in range(CFG.batch_size):
            segments = batch["segment_ids"][row]
            for segment in set(segments.tolist()) - {0}:
                where = np.flatnonzero(segments == segment)
                assert (np.diff(where) == 1).all()
                np.testing.assert_array_equal(batch["positions"][row][where], np.arange(len(where)))
                ids = batch["inputs"][row][where].tolist()
                assert ids[0] == tokenizer.bos_id  # it starts in this row ...
                # ... and is one whole training conversation (its last token is the row's
                # last target when it ends the row).
                last = int(batch["targets"][row][where[-1]])
                rendered = whole.get(tuple(ids)) or whole[(*ids, last)]
                expected = np.zeros(len(where), np.float32)
                expected[: len(rendered) - 1] = rendered.trained[1:]
                np.testing.assert_array_equal(batch["loss_mask"][row][where], expected)
                seen += 1
    assert seen > 6 * CFG.batch_size  # rows hold several conversations


def test_the_train_iterator_resumes_exactly_and_heldout_is_one_pass(tokenizer):
    data = prepare(CFG, tokenizer, conversations(60))
    it = make_iterator(CFG, data, tokenizer, Split.TRAIN)
    for _ in range(5):  # past one epoch: 60 conversations make fewer than 20 rows
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    again = make_iterator(CFG, data, tokenizer, Split.TRAIN)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(3)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    heldout = list(make_iterator(CFG, data, tokenizer, Split.HELDOUT))
    trained = sum(float(b["loss_mask"].sum()) for b in heldout)
    assert trained == data.stats["heldout_trained_tokens"]
    tokens = sum(len(r) for r in data.train)
    assert -(-tokens // (CFG.seq_len + 1)) <= rows_per_epoch(CFG, data) <= len(data.train)


def test_data_from_a_file_and_bad_records(tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps({"messages": [m.to_dict() for m in c]}) for c in conversations(40)]
    path.write_text("\n".join([*lines[:5], "{broken", *lines[5:]]) + "\n")
    cfg = SFTDataConfig(path=str(path), seq_len=63, heldout_fraction=0.2)
    with pytest.raises(ValueError, match=r"sft\.jsonl:6: not JSON"):
        prepare(cfg, tokenizer)
    skipping = SFTDataConfig(path=str(path), seq_len=63, heldout_fraction=0.2, on_bad=BadData.SKIP)
    data = prepare(skipping, tokenizer)
    assert data.stats["skipped_bad"] == 1 and data.stats["skipped: not JSON"] == 1
    assert len(data.train) + len(data.heldout) == 40
    with pytest.raises(ValueError, match="exactly one of"):
        prepare(skipping, tokenizer, conversations(3))
    with pytest.raises(ValueError, match="exactly one of"):
        prepare(CFG, tokenizer)


def test_a_split_left_empty_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no heldout conversations"):
        prepare(CFG, tokenizer, conversations(2))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq_len", 0),
        ("batch_size", 1.5),
        ("heldout_fraction", 1.0),
        ("layout", "think"),
        ("over_long", "cut"),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SFTDataConfig(**{field: value})


def test_rendering_is_the_chat_renderers(tokenizer):
    data = prepare(CFG, tokenizer, conversations(30))
    rendered = {tuple(render(c, tokenizer).ids.tolist()) for c in conversations(30)}
    assert {tuple(r.ids.tolist()) for r in data.train} <= rendered
