"""Code-execution reward: run the completion's program on test cases in the sandbox (issues 6, 13).

    reward = Weighted({format_reward: 0.5, code_execution: 1.0})
    totals, per_function = reward(prompts, completions, tests=tests)

The program is the <answer> of an R1-Zero-format completion (rl.rewards.parse), or of any
completion the last ```python (or ```py, or bare ```) fenced block; inside an <answer> a fenced
block wins over the bare text. A completion with neither has no program and scores 0.

Test cases, per sample a list of any mix of (a single string is one assert case):
  - stdin/stdout: {"input": str, "output": str} or the tuple (input, output). Passes when the
    program exits 0 and its stdout equals the output after trailing whitespace is stripped
    from each line and trailing blank lines are dropped.
  - assert: one Python assert statement about the program (a message after a comma is
    ignored), of one of these forms, with L a literal (ast.literal_eval) of plain data:
        assert E == L   (or L == E)        assert E is None / E is True / E is False
        assert math.isclose(E, L[, rel_tol=..][, abs_tol=..])   (or a bare isclose)
        assert E                           assert not E
    Only E goes to the sandbox, one run per case: the harness runs the program as __main__
    (empty stdin; on a thread of its own, so signal.signal is not available), evaluates E in
    its namespace and reports the value as plain data (rl/code_harness.py);
    L never leaves this process, which judges the value: `==` and `is` by
    rl.code_harness.equal (floats within rel 1e-9, abs 1e-9 of each other, bool equals only
    bool, NaN nothing), isclose as math.isclose with the test's tolerances (real numbers
    only), `assert E` / `assert not E` by the truthiness of the plain value. E computes a
    value, never a verdict: it may not contain a comparison, and/or/not or `x if c else y`;
    and where a bool decides (`assert E`, `not E`, `== True`, `is False`, ...) E must call a
    function of the program's (its callee not a builtin or a standard module), so that no
    built-in check runs on objects the program made. Any other assert is malformed.
Score = the fraction of cases passed. A crash, timeout, memory or output blow-up, or anything
the sandbox refuses fails that case; nothing the completion does raises. Malformed test cases
(the data, not the model) raise ValueError naming the case.

Why a pass cannot be faked (tests/test_code_reward_hostile.py tries): an assert case passes
only on the harness's report of E's value, never on the exit status; a run that ends before
the report (sys.exit, os._exit, a signal, closed descriptors, a crash) fails. The report
needs a per-run secret the program cannot read, and exactly one report counts (rl/sandbox.py;
rl/sandbox_child.py `_run_case` says how the secret is kept out of reach). The value is
serialised by C code bound before the program ran, so rebinding builtins, json or marshal
changes nothing, and an object of the program's (an int whose __eq__ is always True) is not
plain data. Above all, the sandbox never sees what a case expects (L, the expected stdout):
what the program reports is compared here, so it can pass only by producing the answer.
"""

from __future__ import annotations

import ast
import builtins
import enum
import math
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rl.code_harness import ABS_TOL, REL_TOL, NotPlain, decode, encode, equal
from rl.rewards import RewardFn, parse
from rl.sandbox import Limits, Status, run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)


@dataclass(frozen=True)
class IOCase:
    """Feed `stdin`; expect `stdout` (compared by `same_output`)."""

    stdin: str
    stdout: str


class Check(enum.Enum):
    """How an assert case judges the value its expression reported."""

    EQUAL = "equal"  # rl.code_harness.equal(value, expected)
    CLOSE = "close"  # math.isclose(value, expected, rel_tol, abs_tol), real numbers only
    TRUTHY = "truthy"  # assert E
    FALSY = "falsy"  # assert not E


@dataclass(frozen=True)
class AssertCase:
    """One assert statement (forms in the module docstring). Only `expression` enters the
    sandbox; `check`, `expected` and the tolerances stay in the parent."""

    code: str
    expression: str = field(init=False, compare=False, repr=False)
    check: Check = field(init=False, compare=False, repr=False)
    expected: object = field(init=False, compare=False, repr=False)
    rel_tol: float = field(init=False, compare=False, repr=False)
    abs_tol: float = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.code, str):
            raise ValueError(f"an assert case must be a str, got {self.code!r}")
        for name, value in _parse_assert(self.code).items():
            object.__setattr__(self, name, value)

    def accepts(self, value) -> bool:
        """Whether the plain value the sandbox reported for `expression` passes."""
        if self.check is Check.TRUTHY or self.check is Check.FALSY:
            return bool(value) is (self.check is Check.TRUTHY)
        if self.check is Check.EQUAL:
            return equal(value, self.expected, self.rel_tol, self.abs_tol)
        if type(value) not in (int, float):
            return False
        try:
            return math.isclose(value, self.expected, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        except OverflowError:  # an int too large for a float
            return False


_NOT_THE_PROGRAM = frozenset(dir(builtins)) | sys.stdlib_module_names
_VERDICTS = (ast.Compare, ast.BoolOp, ast.IfExp)
_MISSING = object()


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def _program_call(node: ast.expr) -> bool:
    """Whether `node` calls a function of the program's (rooted at a name that is neither a
    builtin nor a standard module): `f(x)`, `Solution().solve(x)`, `f(x).method()`."""
    if not isinstance(node, ast.Call):
        return False
    root = node.func
    while isinstance(root, ast.Attribute | ast.Call | ast.Subscript):
        root = root.func if isinstance(root, ast.Call) else root.value
    return isinstance(root, ast.Name) and root.id not in _NOT_THE_PROGRAM


def _is_isclose(node: ast.expr) -> bool:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.attr == "isclose" and node.value.id == "math"
    return isinstance(node, ast.Name) and node.id == "isclose"


def _is_compare(node: ast.expr, op: type) -> bool:
    return isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], op)


def _is_verdict(node: ast.AST) -> bool:
    return isinstance(node, _VERDICTS) or (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
    )


class _Malformed(ValueError):
    def __init__(self, code: str, why: str):
        super().__init__(
            f"assert case {code!r}: {why}; the forms allowed are `assert E == L`, `E is "
            "None/True/False`, `math.isclose(E, L, ...)`, `assert f(..)` and `assert not f(..)`"
            " with L a literal (see rl/code_reward.py)"
        )


def _parse_assert(code: str) -> dict:
    """The derived fields of AssertCase(code); ValueError naming the case if malformed."""
    try:
        body = ast.parse(code).body
    except SyntaxError as error:
        raise _Malformed(code, f"not Python ({error.msg})") from None
    if len(body) != 1 or not isinstance(body[0], ast.Assert):
        raise _Malformed(code, "not exactly one assert statement")
    test, tolerances = body[0].test, {"rel_tol": REL_TOL, "abs_tol": ABS_TOL}
    if _is_compare(test, ast.Is):
        expr, expected, check = test.left, _literal(test.comparators[0]), Check.EQUAL
        if not any(expected is constant for constant in (None, True, False)):
            raise _Malformed(code, "`is` compares only with None, True or False")
    elif _is_compare(test, ast.Eq):
        (expr, expected), check = _split(code, test.left, test.comparators[0]), Check.EQUAL
    elif isinstance(test, ast.Call) and _is_isclose(test.func):
        tolerances, check = _tolerances(code, test), Check.CLOSE
        expr, expected = _split(code, *test.args)
        if type(expected) not in (int, float):
            raise _Malformed(code, f"isclose compares real numbers, not {expected!r}")
    elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        expr, expected, check = test.operand, None, Check.FALSY
    else:
        expr, expected, check = test, None, Check.TRUTHY
    if any(_is_verdict(node) for node in ast.walk(expr)):
        raise _Malformed(code, f"{ast.unparse(expr)} would compute the verdict in the sandbox")
    if (check in (Check.TRUTHY, Check.FALSY) or type(expected) is bool) and not _program_call(expr):
        raise _Malformed(code, f"a bool must come from the program's own function, not from "
                               f"{ast.unparse(expr)}")  # fmt: skip
    try:
        encode(expected)
    except NotPlain as error:
        raise _Malformed(code, f"the expected value is not plain data ({error})") from None
    return dict(expression=ast.unparse(expr), check=check, expected=expected, **tolerances)


def _split(code: str, left: ast.expr, right: ast.expr) -> tuple[ast.expr, object]:
    """(the expression to evaluate, the expected literal) of `left == right`, either order."""
    on_right, on_left = _literal(right), _literal(left)
    if on_right is not _MISSING and on_left is not _MISSING:
        raise _Malformed(code, "both sides are literals, so nothing of the program is tested")
    if on_right is not _MISSING:
        return left, on_right
    if on_left is not _MISSING:
        return right, on_left
    raise _Malformed(code, "one side must be a literal (the expected value)")


def _tolerances(code: str, call: ast.Call) -> dict[str, float]:
    """math.isclose's tolerances (its defaults where the test gives none)."""
    found = {keyword.arg: _literal(keyword.value) for keyword in call.keywords}
    if len(call.args) != 2 or set(found) - {"rel_tol", "abs_tol"}:
        raise _Malformed(code, "isclose takes the value, the expected number, rel_tol, abs_tol")
    if any(type(t) not in (int, float) or not 0 <= t < math.inf for t in found.values()):
        raise _Malformed(code, "isclose's tolerances must be finite literal numbers >= 0")
    return {"rel_tol": 1e-9, "abs_tol": 0.0} | {name: float(t) for name, t in found.items()}


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
            try:
                cases.append(AssertCase(case))
            except ValueError as error:
                raise ValueError(f"{where}[{i}]: {error}") from None
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
    """Run one case in the sandbox (one run per case) and judge it here."""
    if isinstance(case, IOCase):
        result = run_python(program, case.stdin, limits)
        return result.status is Status.OK and same_output(result.stdout, case.stdout)
    result = run_python(program, "", limits, evaluate=case.expression)
    if result.status is not Status.OK or result.value is None:
        return False
    try:
        return case.accepts(decode(result.value))
    except ValueError:  # not in the harness's format: not the harness's report
        return False


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
