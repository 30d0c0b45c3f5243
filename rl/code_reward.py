"""Code-execution reward: run the completion's program on test cases in the sandbox (issue 6).

    reward = Weighted({format_reward: 0.5, code_execution: 1.0})
    totals, per_function = reward(prompts, completions, tests=tests)

The program is the <answer> of an R1-Zero-format completion (rl.rewards.parse), or of any
completion the last ```python (or ```py, or bare ```) fenced block; inside an <answer> a fenced
block wins over the bare text. A completion with neither has no program and scores 0.

Test cases, per sample a list of any mix of (a single string is one assert case):
  - stdin/stdout: {"input": str, "output": str} or the tuple (input, output). Passes when the
    program exits 0 and its stdout equals the output after trailing whitespace is stripped
    from each line and trailing blank lines are dropped.
  - assert: a string of Python (say "assert add(2, 3) == 5"), appended to the program and run
    with empty stdin. Passes when the run exits 0.
Score = the fraction of cases passed. A crash, timeout, memory or output blow-up, or anything
the sandbox refuses fails that case; nothing the completion does raises. Malformed test cases
(the data, not the model) raise ValueError.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rl.rewards import RewardFn, parse
from rl.sandbox import Limits, Status, run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)


@dataclass(frozen=True)
class IOCase:
    """Feed `stdin`; expect `stdout` (compared by `same_output`)."""

    stdin: str
    stdout: str


@dataclass(frozen=True)
class AssertCase:
    """Python appended to the program; passing means exiting 0."""

    code: str


def extract_program(completion: str, max_chars: int = 65536) -> str | None:
    """The program in a completion (see the module docstring), or None."""
    parsed = parse(completion)
    text = parsed[1] if parsed is not None else completion
    blocks = _FENCE.findall(text)
    if blocks:
        program = blocks[-1]
    elif parsed is not None:
        program = text
    else:
        return None
    return program if program.strip() and len(program) <= max_chars else None


def same_output(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    norm = lambda text: [line.rstrip() for line in text.rstrip().splitlines()]
    return norm(actual) == norm(expected)


def to_cases(spec, where: str = "tests") -> list[IOCase | AssertCase]:
    """One sample's test cases from the formats in the module docstring."""
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"{where} must be a non-empty list of test cases, got {spec!r}")
    cases: list[IOCase | AssertCase] = []
    for i, case in enumerate(spec):
        if isinstance(case, IOCase | AssertCase):
            cases.append(case)
        elif isinstance(case, str):
            cases.append(AssertCase(case))
        elif isinstance(case, dict) and set(case) == {"input", "output"}:
            cases.append(IOCase(str(case["input"]), str(case["output"])))
        elif isinstance(case, tuple | list) and len(case) == 2:
            cases.append(IOCase(str(case[0]), str(case[1])))
        else:
            raise ValueError(
                f"{where}[{i}] must be an assert string, {{'input': .., 'output': ..}} or an "
                f"(input, output) pair, got {case!r}"
            )
    return cases


def passes(program: str, case: IOCase | AssertCase, limits: Limits) -> bool:
    """Run one case in the sandbox."""
    if isinstance(case, AssertCase):
        return run_python(f"{program}\n\n{case.code}\n", "", limits).status is Status.OK
    result = run_python(program, case.stdin, limits)
    return result.status is Status.OK and same_output(result.stdout, case.stdout)


DEFAULT_LIMITS = Limits(wall_s=5.0, cpu_s=5)


def make_code_execution(
    limits: Limits = DEFAULT_LIMITS, workers: int = 4, max_chars: int = 65536
) -> RewardFn:
    """The reward with chosen sandbox limits and number of concurrent sandboxes."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def code_execution(
        prompts: Sequence[str], completions: Sequence[str], *, tests: Sequence, **_
    ) -> list[float | None]:
        """Fraction of the sample's test cases its program passes in the sandbox."""
        cases = [to_cases(spec, f"tests[{i}]") for i, spec in enumerate(tests)]
        if len(cases) != len(completions):
            raise ValueError(f"got {len(completions)} completions but {len(cases)} test lists")
        programs = [extract_program(c, max_chars) for c in completions]
        jobs = [(i, case) for i, p in enumerate(programs) if p is not None for case in cases[i]]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda job: passes(programs[job[0]], job[1], limits), jobs)
            passed = [0] * len(completions)
            for (i, _), ok in zip(jobs, results, strict=True):
                passed[i] += ok
        return [passed[i] / len(cases[i]) for i in range(len(completions))]

    return code_execution


code_execution = make_code_execution()
