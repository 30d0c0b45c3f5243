"""The embedded tasks in two languages: questions and worked reasoning in English or Chinese.

R1's language-consistency reward scores the share of a chain of thought written in the
prompt's language (rl/rewards.language_consistency, by script: "latin" or "cjk"). For it to
have something to fix, the embedded world asks each arithmetic and countdown problem in either
language, expects the reasoning in that language, and its base corpus sometimes switches
language partway through a worked solution (`switched`), as text scraped from the web does: a
policy grown from it by R1-Zero-style RL mixes languages, as R1-Zero did.

Translation is by line templates over the fixed vocabulary of the worked solutions
(train/arithmetic.py, rl/cold_start.py); numbers and operators stay as they are, so a
translated line states the same values. A problem's split is decided by its English question
(hash splits), so its two phrasings are always on the same side.
"""

from __future__ import annotations

import re

import numpy as np

EN = "latin"  # the values language_consistency reads
ZH = "cjk"
LANGUAGES = (EN, ZH)

# (English line pattern, Chinese template) for every line shape the worked solutions use.
_LINES = (
    (r"(?P<lhs>.+?) = (?P<v>-?\d+), write (?P<d>\d), carry (?P<c>\d)",
     r"\g<lhs> = \g<v>，写 \g<d>，进 \g<c>"),
    (r"(?P<lhs>.+?) = (?P<v>-?\d+), write (?P<d>\d), borrow (?P<c>\d)",
     r"\g<lhs> = \g<v>，写 \g<d>，借 \g<c>"),
    (r"(?P<lhs>.+?) = (?P<v>-?\d+), write (?P<d>\d)", r"\g<lhs> = \g<v>，写 \g<d>"),
    (r"write the final carry (?P<c>\d)", r"写下最后的进位 \g<c>"),
    (r"I need (?P<q>[\d +\-*]+)\.", r"我要算 \g<q>。"),
    (r"I need (?P<t>\d+) from (?P<n>[\d, ]+), each used once\.",
     r"要用 \g<n> 各一次，得到 \g<t>。"),
    (r"try (?P<e>.+?) = (?P<v>-?\d+)\. check: (?P<w>-?\d+) is not (?P<t>-?\d+): wrong, redo\.",
     r"试 \g<e> = \g<v>。检查：\g<w> 不是 \g<t>，错了，重做。"),
    (r"try (?P<e>.+?) = (?P<v>-?\d+)\.", r"试 \g<e> = \g<v>。"),
    (r"check: it uses (?P<n>[\d, ]+) once each and equals (?P<t>-?\d+): correct\.",
     r"检查：\g<n> 各用一次，结果是 \g<t>，正确。"),
    (r"check: (?P<a>.+?) = (?P<v>\S+), which is (?P<b>-?\d+): correct\.",
     r"检查：\g<a> = \g<v>，就是 \g<b>，正确。"),
    (r"check: (?P<a>.+?) = (?P<v>-?\d+), not (?P<w>-?\d+): wrong, redo\.",
     r"检查：\g<a> = \g<v>，不是 \g<w>，错了，重做。"),
    (r"check: anything times 0 is 0, and (?P<v>-?\d+) is 0: correct\.",
     r"检查：任何数乘 0 都得 0，\g<v> 就是 0，正确。"),
)  # fmt: skip
_COMPILED = tuple((re.compile(p), t) for p, t in _LINES)


def to_chinese(line: str) -> str:
    """One line of a worked solution in Chinese (a line without words, such as
    "56 - 3 = 53", is both); ValueError for a line of unknown shape (a new line shape in the
    solutions needs its template here)."""
    if not re.search(r"[^\W\d_]", line):
        return line
    for pattern, template in _COMPILED:
        match = pattern.fullmatch(line)
        if match is not None:
            return match.expand(template)
    raise ValueError(f"no Chinese template for the reasoning line {line!r}")


def reasoning(lines: list[str], language: str) -> list[str]:
    """The lines in `language` (English lines are the source)."""
    check(language)
    return list(lines) if language == EN else [to_chinese(line) for line in lines]


def switched(lines: list[str], language: str, rng: np.random.Generator) -> list[str]:
    """The lines begun in `language` and continued in the other one from a random line on:
    a worked solution that switches language midway. The cut leaves words on both sides
    (a line such as "56 - 3 = 53" has none); lines that allow no such cut stay in
    `language`."""
    check(language)
    worded = [i for i, line in enumerate(lines) if re.search(r"[^\W\d_]", line)]
    cuts = [c for c in range(1, len(lines)) if worded[0] < c <= worded[-1]] if worded else []
    if not cuts:
        return reasoning(lines, language)
    cut = cuts[int(rng.integers(len(cuts)))]
    other = ZH if language == EN else EN
    return reasoning(lines[:cut], language) + reasoning(lines[cut:], other)


def arithmetic_question(question: str, language: str) -> str:
    """'What is 12 + 7?' or its Chinese phrasing."""
    check(language)
    return f"What is {question}?" if language == EN else f"{question} 等于多少？"


def countdown_question(numbers: list[int], target: int, language: str) -> str:
    """The countdown question (rl/tasks.py's wording) or its Chinese phrasing."""
    check(language)
    listed = ", ".join(map(str, numbers))
    if language == EN:
        return (
            f"Using the numbers {listed}, each exactly once, and + - * / with parentheses, "
            f"write an expression equal to {target}."
        )
    return f"用数字 {listed}，每个恰好用一次，以及 + - * / 和括号，写出一个等于 {target} 的算式。"


def check(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
