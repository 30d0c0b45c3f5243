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


def task_columns(tasks: Sequence[Mapping[str, Any]], repeat: int = 1) -> dict[str, list]:
    """The tasks' reward columns (everything but `prompt`), each task repeated `repeat`
    times in a row (G samples per prompt)."""
    keys = [k for k in tasks[0] if k != "prompt"]
    return {k: [t[k] for t in tasks for _ in range(repeat)] for k in keys}


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
    completion_len: mean tokens}, {name: per-task scores, "completion": texts})."""
    per_task: dict[str, list] = {name: [] for name in fns} | {"completion": []}
    lengths: list[int] = []
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        prompts = [tokenizer.encode(t["prompt"]) for t in chunk]
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
