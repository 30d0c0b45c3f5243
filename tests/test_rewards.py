"""Rule-based rewards on tricky cases."""

from __future__ import annotations

import functools

import pytest

from rl.rewards import (
    Weighted,
    countdown_reward,
    format_reward,
    integer_accuracy,
    language_consistency,
    last_integer_accuracy,
    math_accuracy,
    parse,
)

GOOD = "<think>12 + 30 is 42</think> <answer>42</answer>"


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        (GOOD, True),
        ("\n<think>\nx\n</think>\n<answer> 7 </answer>\n", True),
        ("<answer>42</answer>", False),  # no reasoning
        ("<think>a</think>", False),  # no answer
        ("<think>a</think> extra <answer>42</answer>", False),  # text between the parts
        ("<think>a</think><answer>42</answer> and more", False),  # text after
        ("<think>a<think>b</think><answer>1</answer>", False),  # nested tag
        ("<think>a</think><answer>1</answer><answer>2</answer>", False),  # two answers
        ("<answer>1</answer><think>a</think>", False),  # wrong order
    ],
)
def test_strict_format(completion, ok):
    assert format_reward([""], [completion]) == [float(ok)]
    assert (parse(completion) is not None) == ok


def test_integer_accuracy():
    completions = [
        GOOD,
        "<think>x</think><answer>1,042</answer>",
        "<think>x</think><answer>42.0</answer>",  # not an integer
        "<think>x</think><answer>-5</answer>",
        "42",  # right number, wrong format
    ]
    assert integer_accuracy([""] * 5, completions, answer=[42, 1042, 42, -5, 42]) == [
        1.0,
        1.0,
        0.0,
        1.0,
        0.0,
    ]


def test_last_integer_accuracy_ignores_format():
    completions = ["The answer is 42.", "<answer>41</answer> no, 42", "42 then 43", "none", "-7"]
    assert last_integer_accuracy([""] * 5, completions, answer=[42, 42, 42, 42, -7]) == [
        1.0,
        1.0,
        0.0,
        0.0,
        1.0,
    ]


def _answer(text):
    return f"<think>work</think><answer>{text}</answer>"


@pytest.mark.parametrize(
    ("gold", "prediction", "score"),
    [
        ("\\frac{1}{2}", "0.5", 1.0),
        ("1/2", "\\frac{1}{2}", 1.0),
        ("0.5", "$\\frac{2}{4}$", 1.0),
        ("2", "x = 2", 1.0),
        ("12345", "12,345", 1.0),
        ("\\sqrt{2}", "1.41", 0.0),  # close is not equal
        ("3", "4", 0.0),
        ("3", "", 0.0),
        ("3", "three and then some words", 0.0),
    ],
)
def test_math_accuracy(gold, prediction, score):
    assert math_accuracy([""], [_answer(prediction)], answer=[gold]) == [score]


def test_math_accuracy_needs_the_format_and_puts_gold_first(monkeypatch):
    assert math_accuracy([""], ["0.5"], answer=["1/2"]) == [0.0]
    import math_verify

    calls = []
    real = math_verify.verify
    monkeypatch.setattr(
        math_verify, "verify", lambda g, p, **kw: calls.append((g, p)) or real(g, p, **kw)
    )
    math_accuracy([""], [_answer("7")], answer=["\\frac{14}{2}"])
    ((gold, guess),) = calls
    assert "\\frac{14}{2}" in gold and "7" in guess


def _countdown(expr):
    return f"<think>try</think><answer>{expr}</answer>"


@pytest.mark.parametrize(
    ("expr", "score"),
    [
        ("(100 - 4) / 2 + 3", 1.0),  # uses 100, 4, 2, 3 once: 51
        ("3 + (100 - 4) / 2", 1.0),
        ("(100 - 4) / 2", 0.0),  # 3 unused
        ("(100 - 4) / 2 + 3 + 0", 0.0),  # 0 not given
        ("(100 - 4) / 2 + 3 * 1", 0.0),  # extra number
        ("100 / (4 - 4) + 2 + 3", 0.0),  # division by zero, 4 twice
        ("__import__('os').system('true')", 0.0),  # never executed
        ("(100 - 4) // 2 + 3", 0.0),  # floor division not allowed
        ("2 ** 100", 0.0),
        ("((100 - 4) / 2 + 3", 0.0),  # syntax error
    ],
)
def test_countdown(expr, score):
    got = countdown_reward([""], [_countdown(expr)], numbers=[[100, 4, 2, 3]], target=[51])
    assert got == [score]


def test_countdown_uses_exact_fractions():
    # 7 / 3 * 3 is exactly 7 with fractions (floats would give 7.000000000000001 in places).
    got = countdown_reward([""], [_countdown("7 / 3 * 3")], numbers=[[7, 3, 3]], target=[7])
    assert got == [1.0]


def test_language_consistency():
    completions = [
        "<think>all english words here</think><answer>1</answer>",
        "<think>two english 两个中文</think><answer>1</answer>",  # 2 Latin + 4 CJK characters
        "<think>123 + 456 = 579</think><answer>579</answer>",  # no words: skipped
        "no format at all",
    ]
    got = language_consistency([""] * 4, completions, language="latin")
    assert got[0] == 1.0 and got[1] == pytest.approx(2 / 6) and got[2] is None and got[3] is None
    assert language_consistency([""], [completions[1]], language="cjk") == [pytest.approx(4 / 6)]
    with pytest.raises(ValueError, match="language must be"):
        language_consistency([""], [GOOD], language="french")


def test_weighted_sum_skips_none():
    reward = Weighted({format_reward: 0.5, language_consistency: 2.0})
    completions = [GOOD, "<think>1 2 3</think><answer>6</answer>", "bad"]
    totals, per_fn = reward([""] * 3, completions)
    assert per_fn["format_reward"] == [1.0, 1.0, 0.0]
    assert totals == [0.5 + 2.0 * (2 / 2), 0.5, 0.0]


def _constant(value: float):
    """A reward factory: every instance's function has the same __name__."""

    def constant(prompts, completions, **_):
        return [value] * len(completions)

    return constant


def test_weighted_names_must_be_unique_and_usable():
    with pytest.raises(ValueError, match=r"two reward functions are named 'constant'.*name them"):
        Weighted({_constant(1.0): 1.0, _constant(2.0): 1.0})
    with pytest.raises(ValueError, match=r"no usable __name__ \('<lambda>'\).*name it explicitly"):
        Weighted({lambda p, c, **_: [1.0] * len(c): 1.0})
    with pytest.raises(ValueError, match="no usable __name__"):
        Weighted({functools.partial(_constant(1.0)): 1.0})
    with pytest.raises(ValueError, match=r"'x' must map to \(reward_fn, weight\)"):
        Weighted({"x": 1.0})
    with pytest.raises(ValueError, match="weight of 'format_reward' must be a finite number"):
        Weighted({format_reward: float("nan")})


def test_weighted_explicit_names_keep_instances_apart():
    one, two = _constant(1.0), _constant(2.0)
    reward = Weighted({"one": (one, 1.0), "two": (two, 10.0), format_reward: 100.0})
    totals, per_fn = reward(["", ""], [GOOD, "bad"])
    assert per_fn == {"one": [1.0, 1.0], "two": [2.0, 2.0], "format_reward": [1.0, 0.0]}
    assert totals == [121.0, 21.0]
    assert reward.weights == {"one": 1.0, "two": 10.0, "format_reward": 100.0}


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0], r"reward 'bad' returned 1 scores for 2 completions"),
        ([1.0, 1.0, 1.0], r"reward 'bad' returned 3 scores for 2 completions"),
        (None, r"reward 'bad' returned NoneType, not a list of 2 scores"),
        ([1.0, float("nan")], r"reward 'bad' returned nan for completion 1"),
        ([1.0, "1"], r"reward 'bad' returned '1' for completion 1"),
    ],
)
def test_weighted_checks_what_each_reward_returns(returned, message):
    reward = Weighted({format_reward: 1.0, "bad": (lambda p, c, **_: returned, 1.0)})
    with pytest.raises(ValueError, match=message):
        reward(["", ""], [GOOD, GOOD])
