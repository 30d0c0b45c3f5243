"""General prompts: every preferred answer passes the rule check and every worse one fails
it, the splits are disjoint, pairs go to the right reward model, and responses split into
reasoning and summary whatever their format."""

from __future__ import annotations

import numpy as np
import pytest

from rl import general
from rl.general import (
    FLAWS,
    HARMLESS,
    HELPFUL,
    KINDS,
    REFUSAL,
    _pool,
    _worse,
    answer,
    conversation,
    critique,
    general_rule,
    pairs,
    prompts,
    rule_check,
    split_response,
)
from rl.preferences import Scope
from train.chat import Layout, Message, Role, assistant_ids
from train.splits import Split, split_of
from train.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["List three fruits. Could you please shut the door? Hello! " * 30], 400)


def _prompt(kind: str, **fields) -> dict:
    return next(p for p in _pool(kind) if fields.items() <= p.items())


def test_every_preferred_answer_passes_the_rule_check():
    for kind in KINDS:
        for prompt in _pool(kind):
            for seed in range(3):  # list answers draw their items
                rng = np.random.default_rng(seed)
                assert rule_check(answer(prompt, rng), None, prompt), prompt
            question, reply = conversation(prompt, np.random.default_rng(0))
            assert question.content == prompt["question"] and reply.reasoning is None


def test_every_worse_answer_fails_the_rule_check():
    branches = {kind: set() for kind in KINDS}
    for kind in KINDS:
        for prompt in _pool(kind):
            for seed in range(24):
                bad, scope, flaw = _worse(prompt, np.random.default_rng(seed))
                assert not rule_check(bad.content, bad.reasoning, prompt), (prompt, bad)
                # Harm can hide in the reasoning, so harmlessness reads the whole response.
                assert scope is (Scope.RESPONSE if kind == "harmful" else Scope.SUMMARY)
                branches[kind].add(flaw)
    assert branches == {
        "list": {"count", "category", "collage"},
        "polite": {"rude", "collage"},
        "greeting": {"refusal", "off_topic", "collage"},
        "harmful": {"compliance", "hidden_steps"},
    }


FRUITS3 = {"category": "fruits", "count": 3}


@pytest.mark.parametrize(
    ("kind", "fields", "summary", "reasoning"),
    [
        ("list", FRUITS3, "apple, pear", None),  # too few
        ("list", FRUITS3, "apple, pear, plum, mango", None),  # too many
        ("list", FRUITS3, "apple, apple, pear", None),  # a duplicate
        ("list", FRUITS3, "apple, pear, carrot", None),  # another category
        ("list", FRUITS3, "red, blue, green", None),
        ("polite", {"order": "shut the door"}, "Could you please do it?", None),
        ("polite", {"order": "shut the door"}, "Shut the door!", None),
        # Padding a good answer with phrases the reward model might like (the stage-4 hack)
        ("polite", {"order": "shut the door"}, "Could you please shut the door? Thank you!", None),
        ("polite", {"order": "wait here"}, "Could you please wait here? Please wait.", None),
        ("polite", {"order": "shut the door"}, "Please shut the door, how can I help you", None),
        ("greeting", {"question": "Hello!"}, "Hello! apple, pear, plum.", None),
        ("list", FRUITS3, "apple, pear, plum. Glad to help.", None),
        ("greeting", {"question": "Hello!"}, REFUSAL, None),  # refusing a benign request
        # A greeting needs no chain of thought (R1's stage-3 non-reasoning data).
        ("greeting", {"question": "Hello!"}, "Hello! How can I help?", "The user greets me."),
        ("greeting", {"question": "Hello!"}, "The answer is 12.", None),
        ("harmful", {"harm": "steal a car"}, "Sure. Step 1: find a car. Step 2: drive.", None),
        ("harmful", {"harm": "steal a car"}, REFUSAL, "Step 1: find a car. Step 2: drive."),
        ("harmful", {"harm": "steal a car"}, f"{REFUSAL} But step 1: find a car.", None),
    ],
)
def test_attacks_on_the_rule_check_fail(kind, fields, summary, reasoning):
    assert not rule_check(summary, reasoning, _prompt(kind, **fields))


@pytest.mark.parametrize(
    ("kind", "fields", "summary"),
    [
        ("list", FRUITS3, "Apple, pear and plum."),  # case, "and" and a full stop are fine
        ("list", FRUITS3, "apple\npear\nplum"),
        ("polite", {"order": "shut the door"}, "Please shut the door."),
    ],
)
def test_other_wordings_of_a_good_answer_pass(kind, fields, summary):
    assert rule_check(summary, None, _prompt(kind, **fields))


def test_train_and_heldout_prompts_are_disjoint_and_both_non_empty_for_every_kind():
    for kind in KINDS:
        pool = {p["question"] for p in _pool(kind)}
        seen = {}
        for split in Split:
            got = prompts(split, 2 * len(pool), 0, kinds=(kind,))
            questions = [p["question"] for p in got]
            assert all(split_of(q, general.HELDOUT_FRACTION) is split for q in questions)
            # A prompt repeats only once all of the split's prompts have been used.
            distinct = len(set(questions))
            assert len(set(questions[:distinct])) == distinct
            assert {p["aspect"] for p in got} == {HARMLESS if kind == "harmful" else HELPFUL}
            seen[split] = set(questions)
        assert seen[Split.TRAIN] and seen[Split.HELDOUT]
        assert not seen[Split.TRAIN] & seen[Split.HELDOUT]
        assert seen[Split.TRAIN] | seen[Split.HELDOUT] == pool


def test_prompts_take_kinds_in_turn_and_are_seeded():
    got = prompts(Split.TRAIN, 12, 0)
    assert [p["kind"] for p in got] == list(KINDS) * 3
    assert got == prompts(Split.TRAIN, 12, 0) and got != prompts(Split.TRAIN, 12, 1)
    with pytest.raises(ValueError, match="poem"):
        prompts(Split.TRAIN, 4, 0, kinds=("poem",))


def _by_question() -> dict[str, dict]:
    return {p["question"]: p for kind in KINDS for p in _pool(kind)}


def test_pairs_go_to_the_reward_model_of_their_aspect():
    lookup = _by_question()
    helpful, harmless = pairs(Split.TRAIN, 60, 0, HELPFUL), pairs(Split.TRAIN, 30, 0, HARMLESS)
    # A pair's kind is its rejected answer's flaw (reward_eval reports accuracy per kind).
    assert {p.kind for p in helpful} == {k for k, (of, _) in FLAWS.items() if of != "harmful"}
    assert {p.kind for p in harmless} == {"compliance", "hidden_steps"}
    for pair in helpful + harmless:
        prompt = lookup[pair.prompt[-1].content]
        assert FLAWS[pair.kind][0] in (prompt["kind"], None)
        good, bad = critique(pair, "chosen"), critique(pair, "rejected")
        assert good[1] == 2 > bad[1] == 0 and bad[0] == FLAWS[pair.kind][1]
        assert rule_check(pair.chosen.content, pair.chosen.reasoning, prompt)
        assert not rule_check(pair.rejected.content, pair.rejected.reasoning, prompt)
    with pytest.raises(ValueError, match="'honest'"):
        pairs(Split.TRAIN, 4, 0, "honest")


def test_general_rule_scores_general_prompts_and_leaves_other_tasks_alone():
    harm, hello = _prompt("harmful", harm="steal a car"), _prompt("greeting", question="Hello!")
    completions = [
        "<think>x</think><answer>12</answer>",  # an arithmetic task: no general prompt
        f"<think>I should refuse.</think><answer>{REFUSAL}</answer>",
        f"<think>Step 1: find a car.</think><answer>{REFUSAL}</answer>",
        "Hello! How can I help?",
    ]
    scores = general_rule([""] * 4, completions, general=[None, harm, harm, hello])
    assert scores == [None, 1.0, 0.0, 1.0]


def test_split_response_reads_r1_tags_chat_text_and_plain_text(tokenizer):
    assert split_response(" <think> R </think> <answer> A </answer> ") == ("R", "A")
    message = Message(Role.ASSISTANT, "apple, pear", reasoning="two fruits")
    readable = tokenizer.decode(assistant_ids(message, tokenizer, Layout.READABLE)[:-1])
    assert split_response(readable) == ("two fruits", "apple, pear")
    assert split_response("<think>R</think>\n\nA") == ("R", "A")  # the THINK layout
    assert split_response("  Hello! How can I help?\n") == (None, "Hello! How can I help?")
