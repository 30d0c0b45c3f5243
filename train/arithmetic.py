"""Seeded, verifiable arithmetic problems (+, -, * on 1-4 digit numbers) with worked solutions.

The same family serves pre-training (as documents, `to_document`) and GRPO (question and
integer answer for a rule-based reward). Every line of a solution is a true equation:

    Question: 478 + 356 = ?            Question: 47 * 38 = ?
    Solution:                          Solution:
    8 + 6 = 14, write 4, carry 1       47 * 38 = 47 * 30 + 47 * 8 = 1410 + 376 = 1786
    7 + 5 + 1 = 13, write 3, carry 1   Answer: 1786
    4 + 3 + 1 = 8, write 8, carry 0
    478 + 356 = 834
    Answer: 834

Subtraction borrows column by column ("12 - 8 - 1 = 3, write 3, borrow 1": the top digit 2
plus a borrowed 10, minus the bottom digit, minus the borrow owed to the column before).
A problem's split is a stable hash of its question, so train and held-out never share one.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from train.splits import DEFAULT_HELDOUT_FRACTION, Split, check_fraction, split_of

MAX_DIGITS = 4


class Operation(enum.Enum):
    """The operations problems use; the value is the operator as written."""

    ADD = "+"
    SUB = "-"
    MUL = "*"


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    """`question` is the canonical expression ("47 * 38"); `solution` the worked steps."""

    question: str
    answer: int
    solution: str


def _digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_solution(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        total = x + y + carry
        lhs = f"{x} + {y}" + (f" + {carry}" if carry else "")
        lines.append(f"{lhs} = {total}, write {total % 10}, carry {total // 10}")
        carry = total // 10
    if carry:
        lines.append(f"write the final carry {carry}")
    lines.append(f"{a} + {b} = {a + b}")
    return lines


def _sub_solution(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i, x in enumerate(da):
        y = db[i] if i < len(db) else 0
        owed = x - y - borrow
        new_borrow = 1 if owed < 0 else 0
        top = x + 10 * new_borrow
        lhs = f"{top} - {y}" + (f" - {borrow}" if borrow else "")
        digit = top - y - borrow
        lines.append(f"{lhs} = {digit}, write {digit}, borrow {new_borrow}")
        borrow = new_borrow
    lines.append(f"{a} - {b} = {a - b}")
    return lines


def _place_parts(n: int) -> list[int]:
    """Nonzero place-value parts of n, most significant first: 3056 -> [3000, 50, 6]."""
    parts = [d * 10**i for i, d in enumerate(_digits(n)) if d]
    return parts[::-1]


def _mul_solution(a: int, b: int) -> list[str]:
    # Distribute over the operand with more nonzero digits; the other stays whole.
    if len(_place_parts(b)) >= len(_place_parts(a)):
        whole, parts, term = a, _place_parts(b), lambda p: f"{a} * {p}"
    else:
        whole, parts, term = b, _place_parts(a), lambda p: f"{p} * {b}"
    chain = [f"{a} * {b}"]
    if len(parts) > 1:
        chain.append(" + ".join(term(p) for p in parts))
        values = [whole * p for p in parts]
        chain.append(" + ".join(map(str, values)))
        # Sum left to right so every step adds just two numbers.
        while len(values) > 1:
            values = [values[0] + values[1], *values[2:]]
            chain.append(" + ".join(map(str, values)))
    else:
        chain.append(str(a * b))
    return [" = ".join(chain)]


_SOLVERS = {
    Operation.ADD: _add_solution,
    Operation.SUB: _sub_solution,
    Operation.MUL: _mul_solution,
}
_EVAL = {Operation.ADD: int.__add__, Operation.SUB: int.__sub__, Operation.MUL: int.__mul__}


def make_problem(a: int, op: Operation, b: int) -> ArithmeticProblem:
    """The problem `a op b` (a, b >= 0; for SUB a >= b so answers stay non-negative)."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be >= 0, got {a} and {b}")
    if op is Operation.SUB and a < b:
        raise ValueError(f"subtraction needs a >= b, got {a} - {b}")
    solution = "\n".join(_SOLVERS[op](a, b))
    question = f"{a} {op.value} {b}"
    return ArithmeticProblem(question=question, answer=_EVAL[op](a, b), solution=solution)


def to_document(problem: ArithmeticProblem) -> str:
    """Pre-training text: question, worked solution, answer."""
    question, solution, answer = problem.question, problem.solution, problem.answer
    return f"Question: {question} = ?\nSolution:\n{solution}\nAnswer: {answer}"


def _random_operand(rng: np.random.Generator, max_digits: int) -> int:
    digits = int(rng.integers(1, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def generate(
    split: Split,
    count: int,
    seed: int,
    *,
    max_digits: int = MAX_DIGITS,
    operations: tuple[Operation, ...] = tuple(Operation),
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> list[ArithmeticProblem]:
    """`count` problems of `split`, the same list for the same arguments.

    Operand lengths are uniform in 1..max_digits. Problems are drawn from one stream and kept
    when the hash of their question falls in `split`, so the splits are disjoint for every
    seed; problems may repeat within a split when the problem space is small.
    """
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if not isinstance(max_digits, int) or not 1 <= max_digits <= 9:
        raise ValueError(f"max_digits must be an int in [1, 9], got {max_digits!r}")
    if not operations or not all(isinstance(op, Operation) for op in operations):
        raise ValueError(f"operations must be a non-empty tuple of Operation, got {operations!r}")
    check_fraction("generate", "heldout_fraction", heldout_fraction)
    rng = np.random.default_rng(seed)
    problems: list[ArithmeticProblem] = []
    attempts = 0
    max_attempts = 1000 * count + 10_000
    while len(problems) < count:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"found only {len(problems)} of {count} {split.value} problems in "
                f"{max_attempts} draws; raise max_digits ({max_digits}) or heldout_fraction"
            )
        op = operations[int(rng.integers(len(operations)))]
        a, b = _random_operand(rng, max_digits), _random_operand(rng, max_digits)
        if op is Operation.SUB and a < b:
            a, b = b, a
        question = f"{a} {op.value} {b}"
        if split_of(question, heldout_fraction) is split:
            problems.append(make_problem(a, op, b))
    return problems
