"""Scoring a policy on tasks: greedy completions judged by reward functions.

means, per_task = evaluate_policy(cfg, variables, tokenizer, heldout,
                                  {"accuracy": integer_accuracy}, max_new_tokens=96)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import model
from model import ModelConfig
from rl.rewards import RewardFn
from train.tokenizer import Tokenizer


def check_tasks(tasks: Sequence[Mapping[str, Any]], where: str) -> None:
    """Raise ValueError unless every task is a mapping with a str `prompt` and the same keys
    as the others (the reward columns); `where` names the list in the message."""
    if isinstance(tasks, str | bytes | Mapping):
        raise ValueError(f"{where}: expected a list of task dicts, got {type(tasks).__name__}")
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            raise ValueError(f"{where}[{i}]: a task is a dict with a 'prompt', got {task!r:.80}")
        if not isinstance(task.get("prompt"), str):
            got = "no 'prompt'" if "prompt" not in task else f"prompt={task['prompt']!r:.80}"
            raise ValueError(f"{where}[{i}]: a task needs a str 'prompt', has {got}")
    keys: set[str] = set().union(*tasks)
    for i, task in enumerate(tasks):
        missing = sorted(keys - task.keys())
        if missing:
            raise ValueError(
                f"{where}[{i}]: lacks {missing}, which other tasks have (every task needs the "
                f"same reward columns: {sorted(keys - {'prompt'})})"
            )


def task_columns(tasks: Sequence[Mapping[str, Any]], repeat: int = 1) -> dict[str, list]:
    """The tasks' reward columns (everything but `prompt`), each task repeated `repeat`
    times in a row (G samples per prompt)."""
    check_tasks(tasks, "tasks")
    keys = sorted({k for t in tasks for k in t} - {"prompt"})
    return {k: [t[k] for t in tasks for _ in range(repeat)] for k in keys}


def prompt_ids(task: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    """A task's prompt as token ids: its `prompt_ids` (e.g. `chat.render`'s, whose special
    tokens the text's encoding would not give; train/tokenizer.py), else the encoded text."""
    ids = task.get("prompt_ids")
    return list(ids) if ids is not None else tokenizer.encode(task["prompt"])


def decode_completions(tokenizer: Tokenizer, completions: Sequence[Sequence[int]]) -> list[str]:
    """Completion texts, without the end-of-sequence token the sampler stopped on."""
    eos = tokenizer.eos_id
    return [tokenizer.decode(c[:-1] if c and c[-1] == eos else c) for c in completions]


def evaluate_policy(
    cfg: ModelConfig,
    variables: dict,
    tokenizer: Tokenizer,
    tasks: Sequence[Mapping[str, Any]],
    fns: Mapping[str, RewardFn],
    *,
    max_new_tokens: int,
    batch_size: int = 256,
) -> tuple[dict[str, float], dict[str, list]]:
    """Greedy completions of every task, scored by each of fns: ({name: mean score,
    completion_len: mean tokens}, {name: per-task scores, "completion": texts,
    "completion_len": tokens}). A task's
    `prompt_ids`, when present, is its prompt as token ids (e.g. `chat.render`'s)."""
    check_tasks(tasks, "evaluate_policy tasks")
    lengths: list[int] = []
    per_task: dict[str, list] = {name: [] for name in fns}
    per_task |= {"completion": [], "completion_len": lengths}
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        prompts = [prompt_ids(t, tokenizer) for t in chunk]
        out = model.generate(
            cfg, variables, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
            stop_tokens=[tokenizer.eos_id],
        )  # fmt: skip
        texts = decode_completions(tokenizer, out.completions())
        prompt_texts = [t["prompt"] for t in chunk]
        for name, fn in fns.items():
            per_task[name] += fn(prompt_texts, texts, **task_columns(chunk))
        per_task["completion"] += texts
        lengths += np.asarray(out.lengths).tolist()
    means = {
        name: float(np.mean([v for v in per_task[name] if v is not None] or [np.nan]))
        for name in fns
    }
    return means | {"completion_len": float(np.mean(lengths))}, per_task


def loop_evaluator(
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    tasks: Sequence[Mapping[str, Any]],
    fns: Mapping[str, RewardFn],
    max_new_tokens: int,
):
    """`evaluate(state, step)` for the training loop: greedy held-out scores of the state's
    policy ({} without tasks or functions)."""

    def evaluate(state, step: int) -> dict[str, float]:
        if not tasks or not fns:
            return {}
        means, _ = evaluate_policy(
            cfg, state.variables, tokenizer, tasks, fns, max_new_tokens=max_new_tokens
        )
        return means

    return evaluate
