"""Rule-based rewards with one interface: fn(prompts, completions, **columns) -> list of
float or None (None: this function has no opinion on that sample and is left out of its sum).

    reward = Weighted({format_reward: 1.0, integer_accuracy: 1.0})
    totals, per_function = reward(prompts, completions, answer=golds)

Rewards read the text after the prompt. R1-Zero's format: reasoning inside <think>...</think>,
then the answer inside <answer>...</answer>, nothing else (PAPER_FACTS.md).
"""

from __future__ import annotations

import ast
import math
import numbers
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

RewardFn = Callable[..., list[float | None]]

_STRICT = re.compile(
    r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.S
)
_TAG = re.compile(r"</?(think|answer)>")


def parse(completion: str) -> tuple[str, str] | None:
    """(reasoning, answer) if the completion is exactly <think>..</think> <answer>..</answer>
    (whitespace around the parts allowed, no nested or repeated tags), else None."""
    match = _STRICT.fullmatch(completion)
    if match is None or _TAG.search(match["think"]) or _TAG.search(match["answer"]):
        return None
    return match["think"], match["answer"]


def format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """1 for the strict R1-Zero format, else 0."""
    return [float(parse(c) is not None) for c in completions]


def _integer(text: str) -> int | None:
    text = text.strip().replace(",", "")
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else None


def integer_accuracy(
    prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[int], **_
) -> list[float]:
    """1 when the <answer> holds exactly the gold integer (commas allowed), else 0."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        parsed = parse(completion)
        out.append(float(parsed is not None and _integer(parsed[1]) == int(gold)))
    return out


def last_integer_accuracy(
    prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[int], **_
) -> list[float]:
    """1 when the last integer anywhere in the completion is the gold, format ignored: how
    often the model reaches the right number at all (a diagnostic, not an R1 reward)."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        found = re.findall(r"[+-]?\d[\d,]*", completion)
        out.append(float(bool(found) and _integer(found[-1]) == int(gold)))
    return out


def _latex(text: str) -> str:
    """math-verify finds answers inside $...$ or \\boxed{}; bare answers get wrapped."""
    text = text.strip()
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_accuracy(
    prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str], **_
) -> list[float]:
    """1 when the <answer> equals the gold answer mathematically (math-verify: 1/2 = 0.5 =
    \\frac{1}{2}, sets, intervals, equations), else 0. math-verify's `verify` is not
    symmetric, so the gold goes first and the prediction second, as its docs require."""
    import math_verify  # sympy is heavy: imported on first use

    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        parsed = parse(completion)
        if parsed is None or not parsed[1].strip():
            out.append(0.0)
            continue
        gold_expr = math_verify.parse(_latex(str(gold)), parsing_timeout=timeout)
        guess = math_verify.parse(_latex(parsed[1]), parsing_timeout=timeout)
        ok = bool(gold_expr and guess) and math_verify.verify(
            gold_expr, guess, timeout_seconds=timeout
        )
        out.append(float(ok))
    return out


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an expression of integer literals, + - * / and parentheses only."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in (*_OPS, ast.Div):
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div):
            return left / right  # ZeroDivisionError is caught by the caller
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


def countdown_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    numbers: Sequence[Sequence[int]],
    target: Sequence[int],
    **_,
) -> list[float]:
    """1 when the <answer> expression uses each given number exactly once and equals the
    target. The expression is parsed, never executed: only integer literals, + - * / and
    parentheses are accepted; anything else scores 0."""
    out = []
    for completion, nums, goal in zip(completions, numbers, target, strict=True):
        parsed = parse(completion)
        score = 0.0
        if parsed is not None and len(parsed[1]) <= 200:
            used: list[int] = []
            try:
                value = _evaluate(ast.parse(parsed[1].strip(), mode="eval"), used)
                score = float(value == goal and Counter(used) == Counter(nums))
            except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
                score = 0.0
        out.append(score)
    return out


_CJK = ("CJK UNIFIED", "HIRAGANA", "KATAKANA", "HANGUL")


def _script(char: str) -> str:
    name = unicodedata.name(char, "")
    if name.startswith("LATIN"):
        return "latin"
    if name.startswith(_CJK):
        return "cjk"
    return "other"


def words_by_script(text: str) -> Counter:
    """Words per script: runs of letters for alphabetic scripts, each character for CJK
    (written without spaces)."""
    counts: Counter = Counter()
    for run in re.findall(r"[^\W\d_]+", text):
        scripts = [_script(c) for c in run]
        cjk = scripts.count("cjk")
        counts["cjk"] += cjk
        rest = [s for s in scripts if s != "cjk"]
        if rest:
            counts[Counter(rest).most_common(1)[0][0]] += 1
    return counts


def language_consistency(
    prompts: Sequence[str], completions: Sequence[str], *, language: str | Sequence[str] = "latin",
    **_,
) -> list[float | None]:  # fmt: skip
    """R1's language-consistency reward: the fraction of the chain of thought's words written
    in the target script ("latin" or "cjk"). None when there is no chain of thought or it has
    no words."""
    targets = [language] * len(completions) if isinstance(language, str) else list(language)
    out: list[float | None] = []
    for completion, target in zip(completions, targets, strict=True):
        if target not in ("latin", "cjk"):
            raise ValueError(f"language must be 'latin' or 'cjk', got {target!r}")
        parsed = parse(completion)
        counts = words_by_script(parsed[0]) if parsed is not None else Counter()
        total = sum(counts.values())
        out.append(counts[target] / total if total else None)
    return out


class Weighted:
    """Several reward functions with weights: (totals, {name: values}); a None is left out of
    the total, and a sample every function skips gets None.

    `Weighted({fn: weight, ...})` names each function by its `__name__`; give names yourself
    with `Weighted({"name": (fn, weight), ...})` (both forms mix) for lambdas, partials or two
    functions from one factory, whose names would collide.
    """

    def __init__(self, weights: Mapping[RewardFn | str, float | tuple[RewardFn, float]]):
        if not weights:
            raise ValueError("Weighted needs at least one reward function")
        self.terms: dict[str, tuple[RewardFn, float]] = {}
        for key, value in weights.items():
            name, fn, weight = _term(key, value)
            if name in self.terms:
                raise ValueError(
                    f"Weighted: two reward functions are named {name!r}; name them explicitly: "
                    f"Weighted({{'{name}_a': (fn_a, 1.0), '{name}_b': (fn_b, 1.0)}})"
                )
            self.terms[name] = fn, weight

    @property
    def weights(self) -> dict[str, float]:
        """{name: weight}: what a run's config records of its reward (rl/grpo.py)."""
        return {name: weight for name, (_, weight) in self.terms.items()}

    def __call__(self, prompts, completions, **columns):
        per_fn = {
            name: _checked(name, fn(prompts, completions, **columns), len(completions))
            for name, (fn, _) in self.terms.items()
        }
        totals: list[float | None] = []
        for i in range(len(completions)):
            parts = [
                weight * per_fn[name][i]
                for name, (_, weight) in self.terms.items()
                if per_fn[name][i] is not None
            ]
            totals.append(sum(parts) if parts else None)
        return totals, per_fn


def _term(key, value) -> tuple[str, RewardFn, float]:
    """(name, fn, weight) of one Weighted entry: fn -> weight, or name -> (fn, weight)."""
    if isinstance(key, str):
        if not (isinstance(value, tuple) and len(value) == 2 and callable(value[0])):
            raise ValueError(f"Weighted: {key!r} must map to (reward_fn, weight), got {value!r}")
        name, (fn, weight) = key, value
    elif callable(key):
        fn, weight = key, value
        name = getattr(fn, "__name__", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"Weighted: {fn!r} has no usable __name__ ({name!r}); name it explicitly: "
                "Weighted({'my_reward': (fn, weight)})"
            )
    else:
        raise ValueError(f"Weighted: keys are reward functions or names, got {key!r}")
    if not name:
        raise ValueError("Weighted: reward names must be non-empty")
    number = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
    if not (number and math.isfinite(weight)):
        raise ValueError(f"Weighted: weight of {name!r} must be a finite number, got {weight!r}")
    return name, fn, float(weight)


def _checked(name: str, values, n: int) -> list[float | None]:
    """One reward function's output, checked: n entries, each a finite number or None."""
    try:
        values = list(values)
    except TypeError:
        raise ValueError(
            f"reward {name!r} returned {type(values).__name__}, not a list of {n} scores"
        ) from None
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} scores for {n} completions")
    for i, v in enumerate(values):
        if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v)):
            raise ValueError(
                f"reward {name!r} returned {v!r} for completion {i}: scores are finite numbers, "
                "or None for no opinion"
            )
    return values
