"""Task lists for rewards and evaluation: every task a dict with a str prompt, same columns."""

from __future__ import annotations

import pytest

from rl.evaluate import check_tasks, evaluate_policy, task_columns
from rl.rewards import integer_accuracy


def test_task_columns_repeat_each_task():
    tasks = [{"prompt": "a", "answer": 1}, {"answer": 2, "prompt": "b"}]
    assert task_columns(tasks, repeat=2) == {"answer": [1, 1, 2, 2]}


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        # A key only the second task has is no longer dropped silently: task 0 lacks it.
        ([{"prompt": "a"}, {"prompt": "b", "answer": 2}], r"train\[0\]: lacks \['answer'\]"),
        ([{"prompt": "a", "answer": 1}, {"prompt": "b"}], r"train\[1\]: lacks \['answer'\]"),
        ([{"prompt": "a"}, {"question": "b"}], r"train\[1\]: a task needs a str 'prompt', has no"),
        ([{"prompt": ["a"]}], r"train\[0\]: a task needs a str 'prompt', has prompt=\['a'\]"),
        ([{"prompt": "a"}, "b"], r"train\[1\]: a task is a dict with a 'prompt', got 'b'"),
        ({"prompt": "a"}, r"train: expected a list of task dicts, got dict"),
    ],
)
def test_bad_task_lists_name_the_task_and_key(tasks, message):
    with pytest.raises(ValueError, match=message):
        check_tasks(tasks, "train")


def test_task_columns_and_evaluate_policy_check_their_tasks():
    with pytest.raises(ValueError, match=r"tasks\[1\]: lacks \['target'\]"):
        task_columns([{"prompt": "a", "target": 1}, {"prompt": "b"}])
    # Checked before any model work: cfg, variables and tokenizer are never touched.
    with pytest.raises(ValueError, match=r"evaluate_policy tasks\[0\]: a task needs a str"):
        evaluate_policy(
            None, None, None, [{"answer": 1}], {"acc": integer_accuracy}, max_new_tokens=4
        )
