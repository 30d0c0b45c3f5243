"""The generative judge: its training conversations, the verdict parser (anything off-format
is no opinion, never an error), and that it is asked at reward time exactly what it was
trained on."""

from __future__ import annotations

import jax
import pytest

import model
from rl.judge import (
    SCORES,
    JudgeReward,
    critique,
    judge_accuracy,
    judge_conversations,
    parse_verdict,
    response_text,
)
from rl.preferences import KINDS, Scope, preference_pairs
from tests.conftest import tiny_config
from train.chat import Layout, Message, Role, assistant_ids, last_user_text, render
from train.splits import Split
from train.tokenizer import train_bpe

PAIRS = preference_pairs(Split.TRAIN, 8, seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(f"{p.prompt[0].content} {p.chosen.reasoning} Score: 0 1 2" for p in PAIRS)
    return train_bpe([text], 360)


def _output(tokenizer, content: str, reasoning: str | None = "ok") -> str:
    """A judge's output text, as decoded from its generated ids."""
    message = Message(Role.ASSISTANT, content, reasoning=reasoning)
    return tokenizer.decode(assistant_ids(message, tokenizer, Layout.THINK)[:-1])


def test_every_kind_has_a_critique_and_the_chosen_response_scores_highest():
    for pair in PAIRS:
        best, _ = critique(pair, "chosen")[1], critique(pair, "rejected")[1]
        assert best == 2 and critique(pair, "rejected")[1] == SCORES[pair.kind] < best
    assert {p.kind for p in PAIRS} == set(KINDS)
    # A mistake's critique names the right answer, which the rejected response does not give.
    mistake = next(p for p in PAIRS if p.kind == "mistake")
    assert mistake.chosen.content in critique(mistake, "rejected")[0]


def test_the_verdict_of_each_training_conversation_parses_to_its_score(tokenizer):
    conversations = judge_conversations(PAIRS, tokenizer)
    assert len(conversations) == 2 * len(PAIRS)
    for conversation, (pair, which) in zip(
        conversations, [(p, w) for p in PAIRS for w in ("chosen", "rejected")], strict=True
    ):
        verdict = conversation[-1]
        text = tokenizer.decode(assistant_ids(verdict, tokenizer, Layout.THINK)[:-1])
        assert parse_verdict(text, tokenizer) == critique(pair, which)[1] / 2
        assert (
            response_text(getattr(pair, which), tokenizer, Layout.READABLE)
            in conversation[0].content
        )


@pytest.mark.parametrize(
    ("content", "reasoning"),
    [
        ("Score: 3", "fine"),  # out of range
        ("Score: 2", None),  # no critique
        ("Score: 2 Score: 2", "x"),
        ("Score: two", "x"),
        ("The score is 2", "x"),
        ("Score: 1\nActually Score: 2", "x"),
        ("Score:", "x"),
    ],
)
def test_off_format_verdicts_are_no_opinion(tokenizer, content, reasoning):
    assert parse_verdict(_output(tokenizer, content, reasoning), tokenizer) is None


def test_well_formed_verdicts_and_blank_output(tokenizer):
    assert parse_verdict(_output(tokenizer, "Score: 2"), tokenizer) == 1.0
    assert parse_verdict(_output(tokenizer, " Score: 1 "), tokenizer) == 0.5
    assert parse_verdict(_output(tokenizer, "Score: 0"), tokenizer) == 0.0
    assert parse_verdict("", tokenizer) is None
    assert parse_verdict("<think>\nunfinished", tokenizer) is None


def test_the_judge_is_asked_what_it_was_trained_on(tokenizer):
    """The reward function renders the same prompt ids as the training conversations, from a
    chat task's prompt text and a policy's decoded completion."""
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=512)
    judge = JudgeReward(cfg, model.init(cfg, jax.random.key(0)), tokenizer, max_new_tokens=4)
    conversations = judge_conversations(PAIRS[:2], tokenizer)
    for pair, conversation in zip(PAIRS[:2], conversations[0::2], strict=True):
        want = render(conversation[:1], tokenizer, layout=Layout.THINK, add_generation_prompt=True)
        prompt_text = tokenizer.decode(
            render(pair.prompt, tokenizer, layout=Layout.READABLE, add_generation_prompt=True).ids
        )
        completion = response_text(pair.chosen, tokenizer, Layout.READABLE)
        assert last_user_text(prompt_text, tokenizer) == pair.prompt[-1].content
        got = judge.prompt_ids(last_user_text(prompt_text, tokenizer), judge.shown(completion))
        assert got == want.ids.tolist()
    # A random judge's output is parsed or no opinion, never an error.
    prompts = [pair.prompt[-1].content for pair in PAIRS[:2]]
    completions = [response_text(pair.chosen, tokenizer, Layout.READABLE) for pair in PAIRS[:2]]
    scores = judge(prompts, completions)
    assert len(scores) == 2 and all(s is None or 0 <= s <= 1 for s in scores)
    metrics = judge_accuracy(judge, PAIRS[:2])
    assert 0 <= metrics["parse_rate"] <= 1 and set(metrics) >= {"verdict_accuracy"}
    # The summary scope shows the judge only the answer after </think>.
    summary = JudgeReward(cfg, judge.variables, tokenizer, scope=Scope.SUMMARY)
    assert summary.shown(completions[0]) == PAIRS[0].chosen.content
    assert summary.shown("") == ""
