"""Code problems: every family's reference program passes its own tests in the sandbox and a
wrong one does not; hash splits; cold-start samples whose answer scores 1 and whose reasoning
R1's filter keeps."""

from __future__ import annotations

import pytest

from rl.code_reward import code_execution
from rl.code_tasks import FAMILIES, code_sample, code_tasks
from rl.sample_filters import FilterConfig, reasoning_checks
from train.chat import Layout, assistant_ids
from train.splits import Split
from train.tokenizer import train_bpe


def _answer(program: str) -> str:
    return f"<think>\nwork\n</think>\n<answer>\n```python\n{program}\n```\n</answer>"


def test_reference_programs_pass_their_tests_and_wrong_ones_do_not():
    tasks = code_tasks(Split.TRAIN, 2 * len(FAMILIES), seed=0)
    assert sorted(t["family"] for t in tasks) == sorted(2 * [f.name for f in FAMILIES])
    prompts = [t["prompt"] for t in tasks]
    tests = [t["tests"] for t in tasks]
    right = code_execution(prompts, [_answer(t["solution"]) for t in tasks], tests=tests)
    assert right == [1.0] * len(tasks)
    wrong = code_execution(prompts, [_answer("def f(*a):\n    return None")] * len(tasks),
                           tests=tests)  # fmt: skip
    assert wrong == [0.0] * len(tasks)


def test_splits_are_disjoint_distinct_and_seeded():
    train = code_tasks(Split.TRAIN, 100, seed=0)
    heldout = code_tasks(Split.HELDOUT, 20, seed=0)
    assert len({t["question"] for t in train}) == 100
    assert not {t["question"] for t in train} & {t["question"] for t in heldout}
    assert code_tasks(Split.TRAIN, 10, seed=3) == code_tasks(Split.TRAIN, 10, seed=3)
    assert all(len(set(t["tests"])) == len(t["tests"]) == 3 for t in train)
    only = code_tasks(Split.TRAIN, 5, seed=0, families=["count"])
    assert all("letter" in t["question"] for t in only)
    with pytest.raises(ValueError, match="families must name"):
        code_tasks(Split.TRAIN, 5, seed=0, families=["sort"])
    with pytest.raises(ValueError, match="only"):
        code_tasks(Split.HELDOUT, 10_000, seed=0)


def test_a_cold_start_code_sample_scores_one_and_passes_the_filters():
    tasks = code_tasks(Split.TRAIN, len(FAMILIES), seed=1)
    samples = [code_sample(t) for t in tasks]
    text = " ".join(f"{m.content} {m.reasoning or ''}" for s in samples for m in s)
    tokenizer = train_bpe([text * 5], 400)
    completions = [
        tokenizer.decode(assistant_ids(s[1], tokenizer, Layout.READABLE)[:-1]) for s in samples
    ]
    scores = code_execution([t["prompt"] for t in tasks], completions,
                            tests=[t["tests"] for t in tasks])  # fmt: skip
    assert scores == [1.0] * len(tasks)
    for sample in samples:
        assert all(reasoning_checks(FilterConfig(), sample[1].reasoning).values())
