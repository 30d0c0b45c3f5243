"""RL task generators: solvable, deterministic, disjoint splits, scored by their rewards."""

from __future__ import annotations

from rl.rewards import countdown_reward, integer_accuracy
from rl.tasks import arithmetic_tasks, countdown_tasks
from train.splits import Split


def test_splits_are_disjoint_and_deterministic():
    for make in (arithmetic_tasks, countdown_tasks):
        train = make(Split.TRAIN, 300, seed=1)
        heldout = make(Split.HELDOUT, 50, seed=1)
        assert make(Split.TRAIN, 300, seed=1) == train
        assert not {t["prompt"] for t in train} & {t["prompt"] for t in heldout}
        assert all("<think>" in t["prompt"] and t["prompt"].endswith("Assistant:") for t in train)


def test_rewards_accept_the_true_answers():
    tasks = arithmetic_tasks(Split.HELDOUT, 20, seed=0)
    completions = [f"<think>compute</think> <answer>{t['answer']}</answer>" for t in tasks]
    golds = [t["answer"] for t in tasks]
    assert integer_accuracy([t["prompt"] for t in tasks], completions, answer=golds) == [1.0] * 20


def test_countdown_targets_are_reachable():
    tasks = countdown_tasks(Split.TRAIN, 50, seed=0)
    for t in tasks:
        assert t["target"] > 0 and len(t["numbers"]) == 3
    # A brute-force solver over left-to-right +, -, * finds every target.
    import itertools

    def solve(t):
        for perm in itertools.permutations(t["numbers"]):
            for ops in itertools.product("+-*", repeat=len(perm) - 1):
                expr = str(perm[0])
                for op, n in zip(ops, perm[1:], strict=True):
                    expr = f"({expr} {op} {n})"
                got = countdown_reward(
                    [""], [f"<think>.</think><answer>{expr}</answer>"],
                    numbers=[t["numbers"]], target=[t["target"]],
                )  # fmt: skip
                if got == [1.0]:
                    return True
        return False

    assert all(solve(t) for t in tasks)
