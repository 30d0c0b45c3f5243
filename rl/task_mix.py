"""Training on a mix of task kinds: one reward function per kind, routed by a `kind` column.

    accuracy = by_kind("accuracy", {"arithmetic": integer_accuracy,
                                    "countdown": countdown_reward, "code": code_execution})
    mixed = uniform(arithmetic + countdown + code)  # every task gets every column

A routed reward calls each kind's function on that kind's samples only, with their columns,
and gives None (no opinion: left out of a Weighted sum, rl/rewards.py) to the other kinds:
R1's stage 4 scores reasoning prompts by rules and general prompts by reward models, in one
batch. rl/evaluate.check_tasks wants one set of columns for all tasks; `uniform` fills the
columns a kind lacks with None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rl.rewards import RewardFn


def uniform(tasks: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every task with every column any task has (None where it had none)."""
    keys: dict[str, None] = {}
    for task in tasks:
        keys.update(dict.fromkeys(task))
    return [{k: task.get(k) for k in keys} for task in tasks]


def by_kind(name: str, fns: Mapping[str, RewardFn]) -> RewardFn:
    """A reward function named `name` that scores each sample with the function for its
    `kind` column (None for kinds not in fns)."""
    if not fns:
        raise ValueError(f"by_kind({name!r}): no reward functions")

    def routed(prompts, completions, *, kind: Sequence[str], **columns) -> list[float | None]:
        if len(kind) != len(completions):
            raise ValueError(f"{name}: {len(kind)} kinds for {len(completions)} completions")
        out: list[float | None] = [None] * len(completions)
        for k, fn in fns.items():
            rows = [i for i, v in enumerate(kind) if v == k]
            if not rows:
                continue
            picked = {c: [values[i] for i in rows] for c, values in columns.items()}
            scores = fn(
                [prompts[i] for i in rows], [completions[i] for i in rows], kind=[k] * len(rows),
                **picked,
            )  # fmt: skip
            scores = list(scores)
            if len(scores) != len(rows):
                raise ValueError(f"{name}: {k!r} returned {len(scores)} scores for {len(rows)}")
            for i, score in zip(rows, scores, strict=True):
                out[i] = score
        return out

    routed.__name__ = name
    routed.kinds = tuple(fns)  # type: ignore[attr-defined]
    return routed
