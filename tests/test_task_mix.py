"""Mixed task kinds: columns made uniform, rewards routed by kind, the embedded world's tasks
(splits, proportions, languages), its routed rewards and its evaluation table."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rl import code_tasks, general, tasks, world, world_rewards
from rl.cold_start import countdown_sample
from rl.languages import EN, ZH
from rl.rewards import Weighted
from rl.task_mix import by_kind, uniform
from rl.world_eval import as_chat_answer, prompt_score, summarize, win_rate
from train.chat import Layout, Message, Role, parse_assistant
from train.splits import Split
from train.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["What is 12 + 34? 等于多少 check: wrong, redo. Hello! " * 30], 400)


def test_uniform_fills_missing_columns_with_none_and_keeps_order():
    items = [{"a": 1}, {"b": 2, "a": 3}, {"c": 4}]
    out = uniform(items)
    assert [list(task) for task in out] == [["a", "b", "c"]] * 3  # first-seen column order
    assert out == [
        {"a": 1, "b": None, "c": None},
        {"a": 3, "b": 2, "c": None},
        {"a": None, "b": None, "c": 4},
    ]
    assert items[0] == {"a": 1}  # the inputs are not changed
    assert uniform([]) == []


def _recorder(calls: list, base: float):
    def fn(prompts, completions, **columns):
        calls.append((list(prompts), list(completions), columns))
        return [base + i for i in range(len(completions))]

    return fn


def test_by_kind_calls_each_function_on_its_kind_only_with_that_subset_in_order():
    xs, ys = [], []
    routed = by_kind(
        "fake", {"x": _recorder(xs, 10.0), "y": _recorder(ys, 20.0), "w": _recorder([], 0)}
    )
    kind = ["x", "y", "z", "x", "y", "x"]
    out = routed(list("pqrstu"), list("abcdef"), kind=kind, answer=[0, 1, 2, 3, 4, 5])
    assert out == [10.0, 20.0, None, 11.0, 21.0, 12.0]
    assert xs == [(["p", "s", "u"], ["a", "d", "f"], {"kind": ["x"] * 3, "answer": [0, 3, 5]})]
    assert ys == [(["q", "t"], ["b", "e"], {"kind": ["y"] * 2, "answer": [1, 4]})]
    assert routed.__name__ == "fake" and routed.kinds == ("x", "y", "w")  # "w": never called


def test_by_kind_refuses_mismatched_lengths_and_no_functions():
    routed = by_kind("fake", {"x": _recorder([], 0.0)})
    with pytest.raises(ValueError, match="2 kinds for 3 completions"):
        routed(["p"] * 3, ["c"] * 3, kind=["x", "x"])
    short = by_kind("short", {"x": lambda prompts, completions, **_: [1.0]})
    with pytest.raises(ValueError, match="'x' returned 1 scores for 2"):
        short(["p"] * 2, ["c"] * 2, kind=["x", "x"])
    with pytest.raises(ValueError, match="no reward functions"):
        by_kind("empty", {})


def _problem_key(task: dict):
    """The problem behind a task in either language."""
    if task["kind"] == "arithmetic":
        return re.search(r"\d+ [+-] \d+", task["question"])[0]
    if task["kind"] == "countdown":
        return tuple(task["numbers"]), task["target"]
    return task["question"]


@pytest.fixture(scope="module")
def heldout():
    return world.reasoning_tasks(Split.HELDOUT, 100, 0)


def test_reasoning_tasks_are_split_mixed_and_in_both_languages(heldout):
    train = world.reasoning_tasks(Split.TRAIN, 300, 0)
    assert not {_problem_key(t) for t in heldout} & {_problem_key(t) for t in train}
    for batch in (heldout, train):
        kinds = [t["kind"] for t in batch]
        n = len(batch)
        assert [kinds.count(k) for k in world.REASONING] == [n // 2, 3 * n // 10, n // 5]
        for task in batch:
            assert set(world.COLUMNS) | {"question", "kind", "language"} == set(task)
            chinese = bool(re.search("[\u4e00-\u9fff]", task["question"]))
            assert chinese == (task["language"] == ZH)
        for kind in ("arithmetic", "countdown"):
            assert {t["language"] for t in batch if t["kind"] == kind} == {EN, ZH}
        assert {t["language"] for t in batch if t["kind"] == "code"} == {EN}
    assert world.reasoning_tasks(Split.HELDOUT, 100, 0) == heldout  # seeded


def test_reasoning_tasks_mix_and_language_options():
    two = world.reasoning_tasks(Split.TRAIN, 40, 1, mix={"arithmetic": 3, "countdown": 1})
    assert [t["kind"] for t in two].count("countdown") == 10
    assert {t["kind"] for t in two} == {"arithmetic", "countdown"}
    # Shares that do not round to the count: arithmetic takes the rest.
    thirds = world.reasoning_tasks(Split.TRAIN, 10, 1, mix=dict.fromkeys(world.REASONING, 1.0))
    assert [[t["kind"] for t in thirds].count(k) for k in world.REASONING] == [4, 3, 3]
    english = world.reasoning_tasks(Split.TRAIN, 40, 1, chinese_fraction=0.0)
    assert {t["language"] for t in english} == {EN}
    chinese = world.reasoning_tasks(Split.TRAIN, 40, 1, chinese_fraction=1.0)
    assert {t["language"] for t in chinese if t["kind"] != "code"} == {ZH}
    with pytest.raises(ValueError, match="poetry"):
        world.reasoning_tasks(Split.TRAIN, 10, 0, mix={"poetry": 1.0})


def test_general_tasks_and_prompt_formats(tokenizer, heldout):
    generals = world.general_tasks(Split.HELDOUT, 8, 0)
    assert {t["kind"] for t in generals} == set(world.GENERAL)
    for task in generals:
        assert set(task) == set(heldout[0]) and task["general"]["question"] == task["question"]
        assert task["kind"] == task["general"]["aspect"]
    chat = world.as_chat(heldout[:3] + generals[:3], tokenizer)
    for item in chat:
        assert item["prompt_ids"][-1] == tokenizer.assistant_id
        assert item["question"] in item["prompt"]
    zero = world.as_r1_zero(heldout[:3] + generals[:3])
    assert [t["prompt"] for t in zero] == [tasks.r1_zero_prompt(t["question"]) for t in zero]


def test_general_documents_use_only_train_prompts():
    docs = world.general_documents(40, 0)
    heldout = {p["question"] for p in general.prompts(Split.HELDOUT, 200, 0)}
    asked = [d.split("\n")[0].removeprefix("Q: ") for d in docs]
    assert len(docs) == 40 and not set(asked) & heldout


def _columns(batch: list[dict]) -> dict[str, list]:
    return {k: [t[k] for t in batch] for k in batch[0]}


def _tagged(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def _right_answers(batch: list[dict], seed: int) -> list[str]:
    """A correct R1-Zero-format completion of every reasoning task."""
    solutions = {
        t["question"]: t["solution"] for t in code_tasks.code_tasks(Split.HELDOUT, 20, seed)
    }
    out = []
    for task in batch:
        if task["kind"] == "arithmetic":
            out.append(_tagged("adding", str(task["answer"])))
        elif task["kind"] == "countdown":
            _, reply = countdown_sample(task, np.random.default_rng(0))
            out.append(_tagged("trying", reply.content))
        elif task["kind"] == "code":
            out.append(_tagged("one line", f"```python\n{solutions[task['question']]}\n```"))
        else:
            out.append(general.REFUSAL)
    return out


def test_accuracy_routes_each_kind_to_its_rule_and_skips_general_prompts(heldout):
    picked = [next(t for t in heldout if t["kind"] == k) for k in world.REASONING]
    batch = [*picked, world.general_tasks(Split.HELDOUT, 2, 0)[1]]
    completions = _right_answers(batch, 0)
    columns = _columns(batch)
    assert world_rewards.accuracy([""] * 4, completions, **columns) == [1.0, 1.0, 1.0, None]
    # The same answers given to the other reasoning task are wrong (the routing, not luck).
    swapped = [completions[1], completions[0]]
    assert world_rewards.accuracy([""] * 2, swapped, **_columns(batch[:2])) == [0.0, 0.0]


def test_format_and_language_score_reasoning_kinds_only(heldout):
    arith = next(t for t in heldout if t["kind"] == "arithmetic" and t["language"] == ZH)
    countdown = next(t for t in heldout if t["kind"] == "countdown" and t["language"] == EN)
    helpful = next(t for t in world.general_tasks(Split.HELDOUT, 4, 0) if t["kind"] == "helpful")
    batch = [arith, arith, countdown, helpful]
    completions = [
        _tagged("七加五得十二", "12"),
        _tagged("seven plus five", "12"),  # a Chinese question reasoned in English
        _tagged("trying it", "1"),
        _tagged("list them", "apple"),
    ]
    columns = _columns(batch)
    assert world_rewards.format_([""] * 4, completions, **columns) == [1.0, 1.0, 1.0, None]
    assert world_rewards.language([""] * 4, completions, **columns) == [1.0, 0.0, 1.0, None]
    rule = world_rewards.general([""] * 4, completions, **columns)
    assert rule[:3] == [None] * 3 and rule[3] is not None
    assert world_rewards.format_.kinds == world.REASONING
    assert world_rewards.general.kinds == world.GENERAL


def test_weighted_rejects_unknown_names_and_drops_zero_weights():
    fns = world_rewards.RULES
    terms = world_rewards.weighted(fns, {"accuracy": 1.0, "format": 0.0, "language": 0.1})
    assert terms == {"accuracy": (fns["accuracy"], 1.0), "language": (fns["language"], 0.1)}
    assert Weighted(terms).weights == {"accuracy": 1.0, "language": 0.1}
    with pytest.raises(ValueError, match=r"\['helpfull'\]"):
        world_rewards.weighted(fns, {"helpfull": 1.0})


def _record(kind, prompt_language=EN, completion_len=10, **scores) -> dict:
    names = ("accuracy", "format", "language", "general", "helpful", "harmless")
    fixed = {"kind": kind, "prompt_language": prompt_language, "completion_len": completion_len}
    return fixed | {name: scores.get(name) for name in names}


RECORDS = [
    _record("arithmetic", EN, 10, accuracy=1.0, format=1.0, language=1.0),
    _record("arithmetic", EN, 20, accuracy=0.0, format=1.0, language=0.5),
    _record("arithmetic", ZH, 30, accuracy=0.0, format=0.0),  # no reasoning: language None
    _record("countdown", ZH, 40, accuracy=1.0, format=1.0, language=1.0),
    _record("helpful", EN, 4, general=1.0, helpful=0.5),
    _record("harmless", EN, 8, general=0.0, harmless=-1.0),
]


def test_summarize_gives_one_row_per_kind_and_language_and_none_where_no_records():
    row = summarize(RECORDS)
    assert row == {
        "arithmetic_en": 0.5,
        "arithmetic_zh": 0.0,
        "countdown_zh": 1.0,  # no countdown_en, no code_*: nothing to average
        "format": 0.75,
        "language": pytest.approx(2.5 / 3),
        "helpful": 0.5,
        "harmless": -1.0,
        "general_rule": 0.5,
        "win_rate": None,
        "len_reasoning": 25.0,
        "len_general": 6.0,
    }
    only_reasoning = summarize(RECORDS[:4])
    assert only_reasoning["helpful"] is None and only_reasoning["general_rule"] is None
    assert only_reasoning["len_general"] is None


def test_win_rate_compares_each_prompts_own_reward_model_and_ties_count_half():
    assert prompt_score(RECORDS[4]) == 0.5 and prompt_score(RECORDS[5]) == -1.0
    assert prompt_score(RECORDS[0]) is None
    baseline = [
        *RECORDS[:4],
        _record("helpful", EN, 4, helpful=0.5, harmless=9.0),  # a tie on its own model
        _record("harmless", EN, 8, harmless=-2.0),  # beaten
    ]
    assert win_rate(RECORDS, baseline) == 0.75
    assert summarize(RECORDS, baseline)["win_rate"] == 0.75
    assert win_rate(RECORDS[:4], RECORDS[:4]) is None  # no general prompt
    with pytest.raises(ValueError, match="6 records against 5"):
        win_rate(RECORDS, RECORDS[:5])


@pytest.mark.parametrize("reasoning", ["12 + 7 = 19, write 9", "12 + 7 = 19，写 9"])
def test_an_r1_zero_completion_reads_back_as_the_same_chat_answer(tokenizer, reasoning):
    text = as_chat_answer(f"<think>\n{reasoning}\n</think>\n<answer>19</answer>", tokenizer)
    assert text == f"<think>\n{reasoning}\n</think>\n<answer>\n19\n</answer>"
    back = parse_assistant(text, tokenizer, Layout.READABLE)
    assert back == Message(Role.ASSISTANT, "19", reasoning=reasoning)
    assert as_chat_answer(text, tokenizer) == text  # a chat answer stays as it is
    assert as_chat_answer("Hello!", tokenizer) == "Hello!"
    assert as_chat_answer("  ", tokenizer) == ""
