"""Small code problems for the code-execution reward (rl/code_reward.py): "write f that
returns ...", each with assert cases, split by a hash of the question like the other tasks.

A family is a question template over one parameter, the reference program and the function
it computes (which gives the expected values: nothing is executed to make a task). A task is

    {"prompt": R1-Zero's template around the question, "question", "tests": [assert ...],
     "solution": the reference program, "family": its name}

`code_sample` writes a cold-start conversation for one (rl/cold_start.py): reasoning that
works two cases by hand, then the program in a fenced block as the answer; the reasoning has
no code block, so R1's rejection-sampling filter keeps it.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence

import numpy as np

from rl.tasks import r1_zero_prompt
from train.chat import Message, Role
from train.splits import Split, split_of

HELDOUT_FRACTION = 0.2
CASES = 3


@dataclasses.dataclass(frozen=True)
class Family:
    """One kind of problem: its question and program for a parameter, and what f computes."""

    name: str
    question: str  # with {p}
    program: str  # with {p}
    params: tuple
    compute: Callable  # (param, argument) -> expected value
    argument: Callable  # rng -> an argument for f
    arg_text: Callable = repr  # how an argument is written in an assert


def _ints(rng) -> int:
    return int(rng.integers(-50, 100))


def _words(rng) -> str:
    letters = np.array(list(string.ascii_lowercase[:8]))
    return "".join(rng.choice(letters, int(rng.integers(3, 9))))


def _lists(rng) -> list[int]:
    return [int(v) for v in rng.integers(-20, 40, int(rng.integers(1, 6)))]


FAMILIES = (
    Family("add", "Write a Python function f(x) that returns x plus {p}.",
           "def f(x):\n    return x + {p}", tuple(range(2, 40)), lambda p, x: x + p, _ints),
    Family("times", "Write a Python function f(x) that returns x times {p}.",
           "def f(x):\n    return x * {p}", tuple(range(2, 30)), lambda p, x: x * p, _ints),
    Family("multiple", "Write a Python function f(x) that returns True if x is a multiple of "
           "{p} and False otherwise.", "def f(x):\n    return x % {p} == 0",
           tuple(range(2, 30)), lambda p, x: x % p == 0, _ints),
    Family("count", "Write a Python function f(s) that returns how many times the letter "
           "'{p}' occurs in the string s.", "def f(s):\n    return s.count('{p}')",
           tuple(string.ascii_lowercase[:8]), lambda p, s: s.count(p), _words),
    Family("largest", "Write a Python function f(xs) that returns the largest number in the "
           "list xs plus {p}.", "def f(xs):\n    return max(xs) + {p}", tuple(range(1, 30)),
           lambda p, xs: max(xs) + p, _lists),
)  # fmt: skip


def _problem(family: Family, param, rng) -> dict:
    question = family.question.format(p=param)
    arguments = []
    while len(arguments) < CASES:  # distinct arguments, so each case tests something new
        argument = family.argument(rng)
        if argument not in arguments:
            arguments.append(argument)
    tests = [f"assert f({family.arg_text(a)}) == {family.compute(param, a)!r}" for a in arguments]
    return {
        "prompt": r1_zero_prompt(question),
        "question": question,
        "tests": tests,
        "solution": family.program.format(p=param),
        "family": family.name,
    }


def code_tasks(
    split: Split,
    count: int,
    seed: int,
    *,
    families: Sequence[str] | None = None,
    repeat: bool = False,
) -> list[dict]:
    """`count` distinct problems of `split` (a hash of the question), families in turn; with
    `repeat`, more than there are: the distinct ones again, in the same order (an RL task
    list that revisits its prompts)."""
    chosen = [f for f in FAMILIES if families is None or f.name in families]
    if not chosen or (families is not None and len(chosen) != len(set(families))):
        raise ValueError(f"families must name some of {[f.name for f in FAMILIES]}, got {families}")
    rng = np.random.default_rng(seed)
    pools = []
    for family in chosen:
        params = [p for p in family.params
                  if split_of(family.question.format(p=p), HELDOUT_FRACTION) is split]  # fmt: skip
        pools.append([(family, params[i]) for i in rng.permutation(len(params))])
    order = [item for group in zip(*pools, strict=False) for item in group]
    order += [item for pool in pools for item in pool[min(map(len, pools)) :]]
    if len(order) < count and not repeat:
        raise ValueError(f"only {len(order)} {split.value} code problems, asked for {count}")
    distinct = [_problem(family, param, rng) for family, param in order[:count]]
    return [distinct[i % len(distinct)] for i in range(count)]


def code_sample(task: dict) -> list[Message]:
    """A cold-start conversation for a code task: two cases worked by hand, then the program."""
    checks = []
    for test in task["tests"][:2]:
        call, expected = test.removeprefix("assert ").split(" == ")
        checks.append(f"{call} should be {expected}.")
    reasoning = "\n".join([
        f"I need a function for this: {task['question']}",
        *checks,
        "The body is one return line; check: it gives those values: correct.",
    ])  # fmt: skip
    answer = f"```python\n{task['solution']}\n```"
    return [
        Message(Role.USER, task["question"]),
        Message(Role.ASSISTANT, answer, reasoning=reasoning),
    ]
