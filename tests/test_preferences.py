"""Preference pairs: files with bad records named or skipped, the embedded generator (split,
distinct, each kind worse than its chosen response), and rendering for a scalar head."""

from __future__ import annotations

import json

import pytest

from rl.preferences import KINDS, Pair, Scope, load_pairs, preference_pairs, render_pair
from rl.rewards import format_reward, integer_accuracy
from train.chat import Layout, Message, Role
from train.conversations import BadData
from train.splits import Split
from train.tokenizer import train_bpe

TEXT = "What is 12 + 34? I need it. check: wrong, redo. The answer is 46. " * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 360, split_digits=True)


def test_generated_pairs_are_split_distinct_and_the_rejected_side_is_worse(tokenizer):
    pairs = preference_pairs(Split.TRAIN, 80, 0)
    assert pairs == preference_pairs(Split.TRAIN, 80, 0)
    questions = [p.prompt[0].content for p in pairs]
    assert len(set(questions)) == 80
    heldout = {p.prompt[0].content for p in preference_pairs(Split.HELDOUT, 20, 0)}
    assert not heldout & set(questions)
    assert {p.kind for p in pairs} == set(KINDS)
    for pair in pairs:
        a, op, b = pair.prompt[0].content.removeprefix("What is ").rstrip("?").split(" ")
        gold = int(a) + int(b) if op == "+" else int(a) - int(b)
        chosen, rejected = (
            tokenizer.decode(ids[ids.tolist().index(tokenizer.assistant_id) + 1 : -1])
            for ids in render_pair(pair, tokenizer)
        )
        assert integer_accuracy([""], [chosen], answer=[gold]) == [1.0]
        score = integer_accuracy([""], [rejected], answer=[gold])[0]
        if pair.kind == "rambling":  # right, but longer
            assert score == 1.0 and len(rejected) > len(chosen)
        else:
            assert score == 0.0
        if pair.kind in ("truncated", "format"):
            assert format_reward([""], [rejected]) == [0.0]
        if pair.kind == "mistake":  # as many lines, and a check that claims "correct"
            got, want = pair.rejected.reasoning.split("\n"), pair.chosen.reasoning.split("\n")
            assert len(got) == len(want) and got[-1].endswith(": correct.")
            assert got[:-2] == want[:-2] and pair.rejected.content != pair.chosen.content


def test_rendering_ends_in_end_of_sentence_and_the_summary_scope_drops_reasoning(tokenizer):
    pair = preference_pairs(Split.TRAIN, 1, 0)[0]
    for scope in Scope:
        for ids in render_pair(pair, tokenizer, scope=scope):
            assert ids[-1] == tokenizer.eos_id
    full, _ = render_pair(pair, tokenizer, scope=Scope.RESPONSE)
    summary, _ = render_pair(pair, tokenizer, scope=Scope.SUMMARY)
    assert tokenizer.think_begin_id in full.tolist()
    assert tokenizer.think_begin_id not in summary.tolist() and len(summary) < len(full)
    layout_ids, _ = render_pair(pair, tokenizer, layout=Layout.THINK)
    assert tokenizer.answer_begin_id not in layout_ids.tolist()


def test_pairs_from_a_file_and_bad_records(tmp_path):
    good = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3", "margin": 0.5}
    chat = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
        "rejected": "go away",
    }
    bad = [
        "{nope",
        json.dumps({"prompt": "x", "chosen": "y"}),
        json.dumps({**good, "margin": "big"}),
        json.dumps({**good, "chosen": {"role": "user", "content": "y"}}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps(chat), *bad]) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: "):
        load_pairs(path)
    pairs, skipped = load_pairs(path, on_bad=BadData.SKIP)
    assert len(pairs) == 2 and sum(skipped.values()) == len(bad)
    assert pairs[0].margin == 0.5 and pairs[1].chosen.reasoning == "greet"
    assert pairs[1].prompt == (Message(Role.USER, "hi"),)
    with pytest.raises(ValueError, match="must end with a user turn"):
        Pair(
            (Message(Role.USER, "a"), Message(Role.ASSISTANT, "b")),
            pairs[0].chosen,
            pairs[0].rejected,
        )
    with pytest.raises(FileNotFoundError, match="preference pairs file not found"):
        load_pairs(tmp_path / "none.jsonl")
