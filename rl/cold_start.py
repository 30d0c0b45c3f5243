"""Cold-start data: long chains of thought in R1's readable format for the embedded tasks.

R1 fine-tunes its base on thousands of long-CoT samples before reasoning RL; on a CPU this
generator stands in for them. Each sample is a conversation: the user asks an arithmetic,
countdown or code question (rl/tasks.py, train/arithmetic.py, rl/code_tasks.py), the
assistant reasons step by step with self-checks, some of which catch a mistake and redo the
step ("check: ... wrong, redo"), then answers (a code answer is a fenced program). Rendered
with `chat.Layout.READABLE` the answer is the summary inside <answer> tags, the value the rule
rewards (integer_accuracy, countdown_reward, code_execution) read.

Problems come from the tasks' own hash splits (HELDOUT problems never appear in TRAIN data),
the sample stream is seeded, and each question appears once.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from rl import code_tasks, languages, tasks
from rl.code_tasks import code_sample
from train import arithmetic
from train.chat import Layout, Message, Role, render
from train.splits import Split
from train.tokenizer import Tokenizer

# A step of a worked solution that states one value: "7 + 8 + 1 = 16, write 6, carry 1".
_STEP = re.compile(r"^(?P<lhs>[\d +\-*]+?) = (?P<value>\d+)(?P<rest>,.*)?$")


def _with_mistake(lines: list[str], rng: np.random.Generator) -> list[str]:
    """The steps with one of them first written wrong, caught by a check and redone."""
    steps = [i for i, line in enumerate(lines) if _STEP.match(line)]
    if not steps:
        return lines
    i = steps[int(rng.integers(len(steps)))]
    step = _STEP.match(lines[i])
    value = int(step["value"])
    wrong = value + 1 if value == 0 or rng.random() < 0.5 else value - 1
    rest = step["rest"] or ""
    slip = f"{step['lhs']} = {wrong}{rest.replace(f'write {value % 10}', f'write {wrong % 10}')}"
    check = f"check: {step['lhs']} = {value}, not {wrong}: wrong, redo."
    return [*lines[:i], slip, check, *lines[i:]]


def _verify(problem: arithmetic.ArithmeticProblem) -> str:
    """A final check of the answer by the inverse operation."""
    a, op, b = problem.question.split(" ")
    a, b, answer = int(a), int(b), problem.answer
    if op == "+":
        return f"check: {answer} - {b} = {answer - b}, which is {a}: correct."
    if op == "-":
        return f"check: {answer} + {b} = {answer + b}, which is {a}: correct."
    if b != 0:
        return f"check: {answer} / {b} = {Fraction(answer, b)}, which is {a}: correct."
    return f"check: anything times 0 is 0, and {answer} is 0: correct."


def arithmetic_sample(
    problem: arithmetic.ArithmeticProblem,
    rng: np.random.Generator,
    mistake_rate: float,
    language: str = languages.EN,
) -> list[Message]:
    """A worked column solution with a final check (and, at `mistake_rate`, a caught slip),
    asked and reasoned in `language` (rl/languages.py)."""
    lines = problem.solution.split("\n")
    if rng.random() < mistake_rate:
        lines = _with_mistake(lines, rng)
    lines = [f"I need {problem.question}.", *lines, _verify(problem)]
    reasoning = "\n".join(languages.reasoning(lines, language))
    question = languages.arithmetic_question(problem.question, language)
    return [
        Message(Role.USER, question),
        Message(Role.ASSISTANT, str(problem.answer), reasoning=reasoning),
    ]


_OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}


def _expressions(numbers: Sequence[int]) -> list[tuple[str, int]]:
    """(text, value) of every expression using each of 2 or 3 numbers once with + - * and
    either grouping, in a fixed order."""
    out = []
    for x in itertools.permutations(numbers):
        if len(x) == 2:
            out += [(f"{x[0]} {op} {x[1]}", _OPS[op](x[0], x[1])) for op in _OPS]
            continue
        for p, q in itertools.product(_OPS, repeat=2):
            out.append((f"({x[0]} {p} {x[1]}) {q} {x[2]}", _OPS[q](_OPS[p](x[0], x[1]), x[2])))
            out.append((f"{x[0]} {p} ({x[1]} {q} {x[2]})", _OPS[p](x[0], _OPS[q](x[1], x[2]))))
    return out


def countdown_sample(
    task: dict, rng: np.random.Generator, max_tries: int = 3, language: str = languages.EN
) -> list[Message] | None:
    """A search: a few wrong expressions, each checked and rejected, then one that works and
    its check, asked and reasoned in `language`. None when no expression of this family (2 or
    3 numbers, + - *) reaches the target."""
    numbers, target = task["numbers"], task["target"]
    if len(numbers) not in (2, 3):
        return None
    candidates = _expressions(numbers)
    order = rng.permutation(len(candidates))
    candidates = [candidates[i] for i in order]
    solutions = [text for text, value in candidates if value == target]
    if not solutions:
        return None
    misses = [(t, v) for t, v in candidates if v != target][: int(rng.integers(0, max_tries + 1))]
    listed = ", ".join(map(str, numbers))
    lines = [f"I need {target} from {listed}, each used once."]
    for text, value in misses:
        lines.append(f"try {text} = {value}. check: {value} is not {target}: wrong, redo.")
    answer = solutions[0]
    lines.append(f"try {answer} = {target}.")
    lines.append(f"check: it uses {listed} once each and equals {target}: correct.")
    question = languages.countdown_question(numbers, target, language)
    return [
        Message(Role.USER, question),
        Message(Role.ASSISTANT, answer, reasoning="\n".join(languages.reasoning(lines, language))),
    ]


def cold_start(
    split: Split,
    count: int,
    seed: int,
    *,
    countdown_fraction: float = 0.3,
    mistake_rate: float = 0.4,
    code_fraction: float = 0.0,
    chinese_fraction: float = 0.0,
    max_digits: int = 2,
    operations: tuple[arithmetic.Operation, ...] = (
        arithmetic.Operation.ADD,
        arithmetic.Operation.SUB,
    ),
) -> list[list[Message]]:
    """`count` distinct cold-start conversations from `split`'s problems: countdown, code
    (rl/code_tasks.py) and arithmetic in the given fractions; `chinese_fraction` of the
    arithmetic and countdown ones are asked and reasoned in Chinese (rl/languages.py)."""
    fractions = (countdown_fraction, mistake_rate, code_fraction, chinese_fraction)
    if not all(0 <= f <= 1 for f in fractions) or countdown_fraction + code_fraction > 1:
        raise ValueError(
            f"countdown_fraction {countdown_fraction!r}, code_fraction {code_fraction!r} and "
            f"mistake_rate {mistake_rate!r} and chinese_fraction {chinese_fraction!r} must be in "
            "[0, 1], the first two summing to <= 1"
        )
    rng = np.random.default_rng(seed)
    n_countdown, n_code = round(count * countdown_fraction), round(count * code_fraction)
    n_arithmetic = count - n_countdown - n_code
    # Draw extra problems: duplicates and unsolved countdowns are dropped.
    problems = arithmetic.generate(
        split, 3 * n_arithmetic + 10, seed, max_digits=max_digits, operations=operations
    )
    countdowns = tasks.countdown_tasks(split, 3 * n_countdown + 10, seed) if n_countdown else []
    codes = code_tasks.code_tasks(split, n_code, seed) if n_code else []
    out: list[list[Message]] = []
    seen: set[str] = set()
    sources = ((countdowns, n_countdown), (codes, n_code), (problems, n_arithmetic))
    for source, want in sources:
        taken = 0
        for item in source:
            if taken == want:
                break
            chinese = chinese_fraction > 0 and rng.random() < chinese_fraction  # no draw at 0
            language = languages.ZH if chinese else languages.EN
            if isinstance(item, arithmetic.ArithmeticProblem):
                sample = arithmetic_sample(item, rng, mistake_rate, language)
            elif "tests" in item:
                sample = code_sample(item)
            else:
                sample = countdown_sample(item, rng, language=language)
            # One sample per problem, whichever language asks it.
            key = (
                item.question
                if isinstance(item, arithmetic.ArithmeticProblem)
                else item["question"]
            )
            if sample is None or key in seen:
                continue
            seen.add(key)
            out.append(sample)
            taken += 1
    if len(out) < count:
        raise ValueError(
            f"only {len(out)} distinct {split.value} problems for {count} cold-start samples; "
            "raise max_digits or lower count"
        )
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def chat_tasks(
    split: Split,
    count: int,
    seed: int,
    tokenizer: Tokenizer,
    *,
    layout: Layout = Layout.READABLE,
    max_digits: int = 2,
    operations: tuple[arithmetic.Operation, ...] = (
        arithmetic.Operation.ADD,
        arithmetic.Operation.SUB,
    ),
) -> list[dict]:
    """Arithmetic tasks asked in the chat format (a user turn, then the generation prompt), for
    rl.evaluate and GRPO: `prompt` (text), `prompt_ids` (rendered) and `answer`."""
    out = []
    problems = arithmetic.generate(split, count, seed, max_digits=max_digits, operations=operations)
    for problem in problems:
        turn = [Message(Role.USER, f"What is {problem.question}?")]
        ids = render(turn, tokenizer, layout=layout, add_generation_prompt=True).ids.tolist()
        out.append({"prompt": tokenizer.decode(ids), "prompt_ids": ids, "answer": problem.answer})
    return out
