"""Verifiable tasks for RL: the R1-Zero prompt template, arithmetic and countdown problems
with disjoint train / held-out splits (by a hash of the question, as train/arithmetic.py).

A task sample is a dict: `prompt` (the templated text) plus the columns its reward reads
(`answer` for integer_accuracy; `numbers` and `target` for countdown_reward).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rl import languages
from train import arithmetic
from train.splits import Split, check_fraction, split_of

# The R1-Zero template's structure (PAPER_FACTS.md), in our own words.
TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant "
    "solves it: it first reasons step by step inside <think> </think>, then gives the final "
    "answer inside <answer> </answer>, as in <think> reasoning </think> <answer> answer "
    "</answer>.\nUser: {question}\nAssistant:"
)


def r1_zero_prompt(question: str) -> str:
    return TEMPLATE.format(question=question)


def arithmetic_tasks(
    split: Split,
    count: int,
    seed: int,
    *,
    max_digits: int = 3,
    operations: tuple[arithmetic.Operation, ...] = tuple(arithmetic.Operation),
) -> list[dict]:
    """Multi-digit +, -, x problems (train/arithmetic.py) as RL samples."""
    problems = arithmetic.generate(split, count, seed, max_digits=max_digits, operations=operations)
    return [{"prompt": arithmetic_prompt(p), "answer": p.answer} for p in problems]


def arithmetic_prompt(problem: arithmetic.ArithmeticProblem) -> str:
    return r1_zero_prompt(f"{problem.question} = ?")


# How the base corpus's assistant answers a templated problem (see `base_corpus`).
REASONED = "reasoned"  # <think> worked solution </think> <answer> N </answer>: the R1-Zero format
ANSWER_ONLY = "answer_only"  # <answer> N </answer> with no reasoning: fails the strict format
PLAIN = "plain"  # "The answer is N." with no tags
DOCUMENT = "document"  # no template: train/arithmetic.py's worked-solution document
STYLES = (REASONED, ANSWER_ONLY, PLAIN, DOCUMENT)


def respond(problem: arithmetic.ArithmeticProblem, style: str, solution: str | None = None) -> str:
    """The assistant's side of a templated problem, in one of STYLES (`solution`: the worked
    lines to show, by default the problem's own)."""
    if style == REASONED:
        lines = problem.solution if solution is None else solution
        return f" <think>\n{lines}\n</think>\n<answer>{problem.answer}</answer>"
    if style == ANSWER_ONLY:
        return f" <answer>{problem.answer}</answer>"
    if style == PLAIN:
        return f" The answer is {problem.answer}."
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def base_corpus(
    count: int,
    seed: int,
    mix: Mapping[str, float],
    *,
    max_digits: int = 3,
    operations: tuple[arithmetic.Operation, ...] = tuple(arithmetic.Operation),
    chinese_fraction: float = 0.0,
    switch_rate: float = 0.0,
) -> list[str]:
    """Pre-training documents for an R1-Zero base: TRAIN-split arithmetic problems, each
    rendered in a style drawn from `mix` (style -> probability): in the template with one of
    three answers, or as a plain worked-solution document (denser: no template tokens).

    A base model has seen some reasoning in the wild but does not reliably use it; the mix
    sets how often (V3-Base saw such data in pre-training). Only TRAIN problems are used, so
    the held-out RL tasks are never in the corpus. `chinese_fraction` of the problems are
    asked and worked in Chinese, and `switch_rate` of the worked solutions switch language
    partway (rl/languages.py), as mixed-language web text does."""
    if set(mix) - set(STYLES) or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"mix must map some of {STYLES} to weights >= 0, got {dict(mix)!r}")
    styles = list(mix)
    p = np.array([mix[s] for s in styles], np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(styles), size=count, p=p / p.sum())
    problems = arithmetic.generate(
        Split.TRAIN, count, seed, max_digits=max_digits, operations=operations
    )
    if not (0 <= chinese_fraction <= 1 and 0 <= switch_rate <= 1):
        raise ValueError("chinese_fraction and switch_rate must be in [0, 1]")
    if chinese_fraction == 0 and switch_rate == 0:  # the English corpus, as it always was
        return [
            arithmetic.to_document(problem)
            if styles[k] == DOCUMENT
            else arithmetic_prompt(problem) + respond(problem, styles[k])
            for problem, k in zip(problems, picks, strict=True)
        ]
    lang_rng = np.random.default_rng([seed, 1])
    docs = []
    for problem, k in zip(problems, picks, strict=True):
        language = languages.ZH if lang_rng.random() < chinese_fraction else languages.EN
        lines = problem.solution.split("\n")
        if lang_rng.random() < switch_rate:
            lines = languages.switched(lines, language, lang_rng)
        else:
            lines = languages.reasoning(lines, language)
        docs.append(_document(problem, styles[k], language, "\n".join(lines)))
    return docs


def _document(
    problem: arithmetic.ArithmeticProblem, style: str, language: str, solution: str
) -> str:
    """One base-corpus document in `language` with the given worked lines."""
    if language == languages.EN and style == DOCUMENT:
        return f"Question: {problem.question} = ?\nSolution:\n{solution}\nAnswer: {problem.answer}"
    if style == DOCUMENT:
        return f"问题：{problem.question} = ?\n解：\n{solution}\n答案：{problem.answer}"
    if language == languages.EN:
        return r1_zero_prompt(f"{problem.question} = ?") + respond(problem, style, solution)
    question = languages.arithmetic_question(problem.question, language)
    if style == PLAIN:
        return r1_zero_prompt(question) + f" 答案是 {problem.answer}。"
    return r1_zero_prompt(question) + respond(problem, style, solution)


def countdown_tasks(
    split: Split,
    count: int,
    seed: int,
    *,
    num_numbers: int = 3,
    max_number: int = 20,
    heldout_fraction: float = 0.1,
) -> list[dict]:
    """Countdown problems that are solvable by construction: the target is the value of a
    random expression over the numbers (a positive integer)."""
    if not 2 <= num_numbers <= 6:
        raise ValueError(f"num_numbers must be in [2, 6], got {num_numbers!r}")
    check_fraction("countdown_tasks", "heldout_fraction", heldout_fraction)
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for _ in range(1000 * count + 10_000):
        if len(out) == count:
            return out
        numbers = [int(x) for x in rng.integers(1, max_number + 1, num_numbers)]
        value = numbers[0]
        for n in numbers[1:]:
            op = rng.integers(3)
            value = value + n if op == 0 else value * n if op == 1 else value - n
        if value <= 0:
            continue
        question = languages.countdown_question(numbers, int(value), languages.EN)
        if split_of(question, heldout_fraction) is split:
            out.append(
                {
                    "prompt": r1_zero_prompt(question),
                    "question": question,
                    "numbers": numbers,
                    "target": int(value),
                }
            )
    raise RuntimeError(f"could not draw {count} countdown problems for {split}")
