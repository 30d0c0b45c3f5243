"""Cold-start data: seeded, split by the tasks' hashes, distinct, correct, with self-checks
and caught slips, and scored 1 by the rule rewards once rendered in the readable layout."""

from __future__ import annotations

import re

import pytest

from rl.code_reward import code_execution
from rl.code_tasks import code_tasks
from rl.cold_start import chat_tasks, cold_start
from rl.rewards import countdown_reward, format_reward, integer_accuracy
from train.chat import Layout, render
from train.splits import Split
from train.tokenizer import train_bpe

TEXT = "What is 12 + 34? Using the numbers 1, 2, each exactly once. check: wrong, redo. " * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 400, split_digits=True)


def _completion(tokenizer, conversation) -> str:
    """The assistant's rendered turn as the policy would write it after the prompt."""
    full = render(conversation, tokenizer, layout=Layout.READABLE)
    prompt = render(conversation[:1], tokenizer, layout=Layout.READABLE, add_generation_prompt=True)
    body = full.ids[len(prompt) : -1]  # up to the end-of-sentence token the sampler stops on
    return tokenizer.decode(body)


def test_samples_are_seeded_distinct_and_split_by_the_tasks_hashes():
    a, b = cold_start(Split.TRAIN, 300, 0), cold_start(Split.TRAIN, 300, 0)
    assert a == b and a != cold_start(Split.TRAIN, 300, 1)
    questions = [c[0].content for c in a]
    assert len(set(questions)) == len(questions)
    heldout = {c[0].content for c in cold_start(Split.HELDOUT, 100, 0)}
    assert not heldout & set(questions)
    assert 0.2 < sum(q.startswith("Using the numbers") for q in questions) / 300 < 0.4


def test_every_sample_is_right_and_scores_on_the_rule_rewards(tokenizer):
    samples = cold_start(Split.TRAIN, 200, 3, mistake_rate=0.5)
    slips = 0
    for conversation in samples:
        question, answer = conversation
        completion = _completion(tokenizer, conversation)
        assert format_reward([""], [completion]) == [1.0]
        if question.content.startswith("What is"):
            a, op, b = question.content.removeprefix("What is ").rstrip("?").split(" ")
            gold = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert integer_accuracy([""], [completion], answer=[gold]) == [1.0]
        else:
            numbers = [int(n) for n in re.findall(r"\d+", question.content.split("write")[0])]
            target = int(question.content.rsplit(" ", 1)[1].rstrip("."))
            assert countdown_reward([""], [completion], numbers=[numbers], target=[target]) == [1.0]
        lines = answer.reasoning.split("\n")
        assert lines[-1].startswith("check:") and lines[-1].endswith("correct.")
        for i, line in enumerate(lines):
            if "wrong, redo" in line and line.startswith("check:"):
                # A caught slip: the step before states the wrong value, the next one redoes it.
                stated, wrong = re.match(r"check: .* = (\d+), not (\d+)", line).groups()
                assert f"= {wrong}" in lines[i - 1] and f"= {stated}" in lines[i + 1]
                slips += 1
    assert slips > 30  # about half the arithmetic samples


def test_chat_tasks_are_prompts_in_the_chat_format(tokenizer):
    tasks = chat_tasks(Split.HELDOUT, 5, 0, tokenizer)
    for task in tasks:
        assert task["prompt_ids"][-1] == tokenizer.assistant_id
        assert task["prompt"].startswith("<｜begin▁of▁sentence｜><｜User｜>What is ")
        assert isinstance(task["answer"], int)


def test_code_samples_are_mixed_in_and_pass_their_tests(tokenizer):
    samples = cold_start(Split.TRAIN, 40, 0, countdown_fraction=0.25, code_fraction=0.25)
    code = [c for c in samples if c[0].content.startswith("Write a Python function")]
    assert len(code) == 10 and len(samples) == 40
    by_question = {t["question"]: t for t in code_tasks(Split.TRAIN, 10, 0)}
    completions = [_completion(tokenizer, c) for c in code]
    tests = [by_question[c[0].content]["tests"] for c in code]
    assert code_execution([""] * 10, completions, tests=tests) == [1.0] * 10
    assert format_reward([""] * 10, completions) == [1.0] * 10


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="mistake_rate"):
        cold_start(Split.TRAIN, 10, 0, mistake_rate=1.5)
    with pytest.raises(ValueError, match="summing to <= 1"):
        cold_start(Split.TRAIN, 10, 0, countdown_fraction=0.6, code_fraction=0.6)
