"""The embedded tasks in two languages: every worked-solution line translates and keeps its
numbers, Chinese reasoning is all CJK (switched reasoning is mixed), Chinese cold-start
samples still score 1 on the rule rewards, the English data is exactly what it was before
the language feature, and both phrasings of a problem sit on the same split."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from rl import languages, tasks
from rl.cold_start import arithmetic_sample, cold_start
from rl.languages import EN, ZH, reasoning, switched, to_chinese
from rl.rewards import countdown_reward, integer_accuracy, language_consistency, words_by_script
from train import arithmetic
from train.chat import Layout, render
from train.splits import Split
from train.tokenizer import train_bpe

ALL_OPS = tuple(arithmetic.Operation)
MIX = {"reasoned": 0.4, "answer_only": 0.2, "plain": 0.2, "document": 0.2}


@pytest.fixture(scope="module")
def tokenizer():
    text = "What is 12 + 34? 等于多少 用数字 check: wrong, redo. 检查 正确 " * 30
    return train_bpe([text], 400, split_digits=True)


def _numbers(line: str) -> list[str]:
    return re.findall(r"-?\d+", line)


def _english_lines() -> list[str]:
    """Every line shape the worked solutions write: all operations up to 3 digits, cold-start
    samples with slips and final checks, and countdown searches."""
    lines = []
    for p in arithmetic.generate(Split.TRAIN, 3000, 0, max_digits=3, operations=ALL_OPS):
        lines += p.solution.split("\n")
    samples = cold_start(
        Split.TRAIN, 400, 0, mistake_rate=0.5, countdown_fraction=0.3, max_digits=3,
        operations=ALL_OPS,
    )  # fmt: skip
    for _, reply in samples:
        lines += reply.reasoning.split("\n")
    return lines


def test_every_worked_solution_line_translates_and_keeps_its_numbers():
    lines = _english_lines()
    # The lines exercise every template but the bare "..., write d" one, a fallback no
    # current solution writes (the table test below checks it).
    unused = [p.pattern for p, _ in languages._COMPILED if not any(map(p.fullmatch, lines))]
    assert unused == [r"(?P<lhs>.+?) = (?P<v>-?\d+), write (?P<d>\d)"]
    for en in lines:
        zh = to_chinese(en)
        if en.startswith("I need") and " from " in en:
            # Chinese names the numbers before the target ("要用 3, 5, 8 各一次，得到 24").
            target, *listed = _numbers(en)
            assert _numbers(zh) == [*listed, target], (en, zh)
        else:
            assert _numbers(zh) == _numbers(en), (en, zh)
        # No English word survives a translation (a template that keeps one would lower the
        # language reward of data that is meant to be all Chinese).
        assert words_by_script(zh)["latin"] == 0, (en, zh)
        if not re.search(r"[^\W\d_]", en):
            assert zh == en  # "56 - 3 = 53" is both languages


@pytest.mark.parametrize(
    ("en", "zh"),
    [
        ("7 + 8 + 1 = 16, write 6, carry 1", "7 + 8 + 1 = 16，写 6，进 1"),
        ("12 - 8 - 1 = 3, write 3, borrow 1", "12 - 8 - 1 = 3，写 3，借 1"),
        ("9 - 2 = 7, write 7", "9 - 2 = 7，写 7"),
        ("write the final carry 1", "写下最后的进位 1"),
        ("I need 478 + 356.", "我要算 478 + 356。"),
        ("I need 24 from 3, 5, 8, each used once.", "要用 3, 5, 8 各一次，得到 24。"),
        ("try 3 - 5 * 8 = -37. check: -37 is not 24: wrong, redo.",
         "试 3 - 5 * 8 = -37。检查：-37 不是 24，错了，重做。"),
        ("try (5 - 3) * 8 = 16.", "试 (5 - 3) * 8 = 16。"),
        ("check: it uses 3, 5, 8 once each and equals 24: correct.",
         "检查：3, 5, 8 各用一次，结果是 24，正确。"),
        ("check: 834 - 356 = 478, which is 478: correct.",
         "检查：834 - 356 = 478，就是 478，正确。"),
        ("check: 7 + 8 = 15, not 16: wrong, redo.", "检查：7 + 8 = 15，不是 16，错了，重做。"),
        ("check: anything times 0 is 0, and 0 is 0: correct.",
         "检查：任何数乘 0 都得 0，0 就是 0，正确。"),
        ("47 * 38 = 47 * 30 + 47 * 8 = 1410 + 376 = 1786",
         "47 * 38 = 47 * 30 + 47 * 8 = 1410 + 376 = 1786"),
    ],
)  # fmt: skip
def test_each_line_shape_has_its_chinese_phrasing(en, zh):
    # Carry (进) and borrow (借) must stay apart: the numbers alone do not tell them apart.
    assert to_chinese(en) == zh


def test_an_unknown_line_or_language_is_refused_by_name():
    line = "so the total is 12"
    with pytest.raises(ValueError, match=re.escape(repr(line))):
        to_chinese(line)
    with pytest.raises(ValueError, match="'fr'"):
        reasoning(["1 + 1 = 2"], "fr")


def _reasoning_lines(seed: int) -> list[str]:
    problem = arithmetic.generate(Split.TRAIN, 1, seed, max_digits=3)[0]
    _, reply = arithmetic_sample(problem, np.random.default_rng(seed), 0.5)
    return reply.reasoning.split("\n")


def _consistency(lines: list[str], target: str) -> float | None:
    completion = f"<think>{chr(10).join(lines)}</think><answer>1</answer>"
    return language_consistency([""], [completion], language=target)[0]


def test_chinese_reasoning_is_all_cjk_and_switched_reasoning_is_mixed():
    for seed in range(30):
        lines = _reasoning_lines(seed)
        assert _consistency(reasoning(lines, ZH), ZH) == 1.0
        assert _consistency(reasoning(lines, EN), EN) == 1.0
        for start in (EN, ZH):
            mixed = switched(lines, start, np.random.default_rng(seed))
            assert 0 < _consistency(mixed, start) < 1, mixed
            # It begins in the asked language and, from the cut on, is the other language.
            cut = next(i for i, line in enumerate(mixed) if line != reasoning(lines, start)[i])
            other = ZH if start == EN else EN
            assert mixed == reasoning(lines[:cut], start) + reasoning(lines[cut:], other)


def test_switched_cuts_at_every_line_but_the_first():
    lines = [f"I need {i} + 1." for i in range(5)]
    cuts = set()
    for seed in range(200):
        mixed = switched(lines, EN, np.random.default_rng(seed))
        cuts.add(sum(line.startswith("I need") for line in mixed))
    assert cuts == {1, 2, 3, 4}
    assert switched(lines[:1], ZH, np.random.default_rng(0)) == reasoning(lines[:1], ZH)


def _completion(tokenizer, conversation) -> str:
    """The assistant's rendered READABLE turn as the policy would write it after the prompt."""
    full = render(conversation, tokenizer, layout=Layout.READABLE)
    prompt = render(conversation[:1], tokenizer, layout=Layout.READABLE, add_generation_prompt=True)
    return tokenizer.decode(full.ids[len(prompt) : -1])


def test_chinese_cold_start_is_asked_and_reasoned_in_chinese_and_still_scores(tokenizer):
    samples = cold_start(Split.TRAIN, 120, 0, chinese_fraction=1.0, mistake_rate=0.5)
    kinds = set()
    for conversation in samples:
        question = conversation[0].content
        completion = _completion(tokenizer, conversation)
        assert language_consistency([""], [completion], language=ZH) == [1.0]
        if arith := re.fullmatch(r"(\d+) ([+-]) (\d+) 等于多少？", question):
            a, op, b = arith.groups()
            gold = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert integer_accuracy([""], [completion], answer=[gold]) == [1.0]
            kinds.add("arithmetic")
        else:
            listed, target = re.fullmatch(
                r"用数字 ([\d, ]+)，.*等于 (\d+) 的算式。", question
            ).groups()
            numbers = [int(n) for n in listed.split(", ")]
            score = countdown_reward([""], [completion], numbers=[numbers], target=[int(target)])
            assert score == [1.0]
            kinds.add("countdown")
    assert kinds == {"arithmetic", "countdown"}


def test_chinese_fraction_mixes_languages_and_leaves_code_in_english():
    samples = cold_start(Split.TRAIN, 200, 0, chinese_fraction=0.5, code_fraction=0.1)
    code = [c for c in samples if c[0].content.startswith("Write a Python function")]
    assert len(code) == 20
    assert all(words_by_script(c[1].reasoning)["cjk"] == 0 for c in code)
    rest = [c for c in samples if c not in code]
    chinese = sum(words_by_script(c[0].content)["cjk"] > 0 for c in rest) / len(rest)
    assert 0.35 < chinese < 0.65


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()[:16]


def test_english_cold_start_is_exactly_what_it_was_before_the_language_feature():
    default = cold_start(Split.TRAIN, 200, 1, mistake_rate=0.5, code_fraction=0.2)
    explicit = cold_start(Split.TRAIN, 200, 1, mistake_rate=0.5, code_fraction=0.2,
                          chinese_fraction=0.0)  # fmt: skip
    assert default == explicit
    # The output of rl/cold_start.py before languages existed (commit 47f9fed), same call:
    # at chinese_fraction=0 no language is drawn, so existing runs' data stream is unchanged.
    assert _digest([[m.to_dict() for m in c] for c in explicit]) == "6ac092f25d3d9c09"


def test_english_base_corpus_is_exactly_what_it_was_before_the_language_feature():
    default = tasks.base_corpus(300, 2, MIX)
    assert default == tasks.base_corpus(300, 2, MIX, chinese_fraction=0.0, switch_rate=0.0)
    assert _digest(default) == "0eb629152d06600f"  # rl/tasks.py at commit 47f9fed, same call


def _think(document: str) -> list[str]:
    # The template itself shows "<think> reasoning </think>"; the document's own is the last.
    return document.rsplit("<think>\n", 1)[1].split("\n</think>")[0].split("\n")


def _problem(document: str) -> arithmetic.ArithmeticProblem:
    a, op, b = re.search(r"User: (\d+) ([+*-]) (\d+)", document).groups()
    return arithmetic.make_problem(int(a), arithmetic.Operation(op), int(b))


def test_switched_corpus_reasoning_begins_in_english_and_ends_in_chinese():
    docs = tasks.base_corpus(600, 0, {"reasoned": 1.0}, switch_rate=1.0)
    both = multi = 0
    for doc in docs:
        assert "等于多少" not in doc  # chinese_fraction 0: every question is English
        lines, english = _think(doc), _problem(doc).solution.split("\n")
        if sum(bool(re.search(r"[a-z]", line)) for line in english) < 2:
            assert lines == english  # no cut leaves words on both sides: no switch
            continue
        cut = next((i for i, line in enumerate(lines) if line != english[i]), len(lines))
        if cut == len(lines):  # the cut fell on word-free lines ("478 + 356 = 834")
            cut = len(lines) - 1
        assert 1 <= cut < len(lines)
        multi += 1
        assert lines == english[:cut] + reasoning(english[cut:], ZH), doc
        counts = words_by_script("\n".join(lines))
        both += counts["latin"] > 0 and counts["cjk"] > 0
    # The cut always leaves words on both sides: every switched document mixes scripts
    # (an add or sub solution ends in a word-free line, "478 + 356 = 834", never a cut).
    assert both == multi > 300


def test_chinese_corpus_is_asked_and_worked_in_chinese():
    docs = tasks.base_corpus(200, 0, MIX, chinese_fraction=1.0)
    for doc in docs:
        if doc.startswith("问题："):
            question = re.match(r"问题：(\d+ [+*-] \d+) = \?", doc)[1]
            worked = doc.split("解：\n")[1].split("\n答案：")[0].split("\n")
        else:
            question = re.search(r"User: (\d+ [+*-] \d+) 等于多少？", doc)[1]
            worked = _think(doc) if "<think>\n" in doc else []
        a, op, b = question.split(" ")
        problem = arithmetic.make_problem(int(a), arithmetic.Operation(op), int(b))
        if worked:
            assert worked == reasoning(problem.solution.split("\n"), ZH)


def _key(question: str):
    """The problem behind either phrasing: "a op b", or (numbers, target) of a countdown."""
    if "数字" not in question and "numbers" not in question:
        return re.search(r"\d+ [+*-] \d+", question)[0]
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    return tuple(numbers[:-1]), numbers[-1]


def test_both_phrasings_of_a_problem_are_on_the_same_split():
    heldout = cold_start(Split.HELDOUT, 100, 0, chinese_fraction=0.5)
    keys = {_key(c[0].content) for c in heldout}
    assert any("等于多少" in c[0].content for c in heldout)
    assert any("用数字" in c[0].content for c in heldout)
    for conversation in heldout:  # a Chinese question is held out as its English one is
        question = conversation[0].content
        if "用数字" in question:
            numbers, target = _key(question)
            english = languages.countdown_question(list(numbers), target, EN)
            assert english in {t["question"] for t in tasks.countdown_tasks(Split.HELDOUT, 200, 0)}
    train = cold_start(Split.TRAIN, 400, 0, chinese_fraction=0.5)
    assert not keys & {_key(c[0].content) for c in train}
    corpus = tasks.base_corpus(800, 0, MIX, max_digits=2, chinese_fraction=0.5)
    found = {re.search(r"(\d+ [+*-] \d+) (=|等于)", d)[1] for d in corpus}
    assert not keys & found
