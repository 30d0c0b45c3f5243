"""One policy's scores on the embedded world's held-out tasks (rl/world.py), for the R1 and
V3 post-training tables:

    records = evaluate_world(cfg, variables, tokenizer, heldout, rms, max_new_tokens=192)
    row = summarize(records, baseline=stage1_records)

Greedy completions of every task, each scored by every routed reward (rl/world_rewards.py):
rules on the reasoning tasks, the general-prompt rule check, and the reward models on the
general prompts. The reward models read each completion as a chat answer to the plain
question (an R1-Zero completion's tags are read as reasoning and answer), so policies asked
in different prompt formats are scored alike. `summarize` gives one row: accuracy per
reasoning task and language, format rate, language consistency, reward-model scores, the
rule-check rate, the win rate against a baseline policy's answers to the same prompts (by the
prompt's reward model; a tie is half a win) and mean response lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model import ModelConfig
from rl import languages
from rl.evaluate import evaluate_policy
from rl.rejection_sampling import to_message
from rl.rewards import RewardFn
from rl.world import GENERAL, REASONING
from rl.world_rewards import RULES, general
from train.chat import Layout, assistant_ids
from train.tokenizer import Tokenizer


def as_chat_answer(completion: str, tokenizer: Tokenizer, layout: Layout = Layout.READABLE) -> str:
    """A completion (chat or R1-Zero tags) as the text of a chat answer in `layout`."""
    message = to_message(completion, tokenizer, layout)
    if message is None:
        return ""
    return tokenizer.decode(assistant_ids(message, tokenizer, layout)[:-1])


def evaluate_world(
    cfg: ModelConfig,
    variables: dict,
    tokenizer: Tokenizer,
    tasks: Sequence[Mapping[str, Any]],
    reward_models: Mapping[str, RewardFn],
    *,
    max_new_tokens: int,
) -> list[dict]:
    """One record per task: kind, prompt_language, every score (None where it does not
    apply), completion_len and the completion."""
    fns = RULES | {"general": general}
    _, per_task = evaluate_policy(
        cfg, variables, tokenizer, tasks, fns, max_new_tokens=max_new_tokens
    )
    answers = [as_chat_answer(c, tokenizer) for c in per_task["completion"]]
    questions = [t["question"] for t in tasks]
    kinds = [t["kind"] for t in tasks]
    for name, fn in reward_models.items():
        per_task[name] = fn(questions, answers, kind=kinds)
    records = []
    for i, task in enumerate(tasks):
        record = {"kind": task["kind"], "prompt_language": task["language"]}
        record |= {name: per_task[name][i] for name in [*fns, *reward_models]}
        record["completion_len"] = int(per_task["completion_len"][i])
        record["completion"] = per_task["completion"][i]
        records.append(record)
    return records


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def prompt_score(record: Mapping[str, Any]) -> float | None:
    """A general prompt's reward-model score (its category's model)."""
    return record.get(record["kind"]) if record["kind"] in GENERAL else None


def win_rate(records: Sequence[Mapping], baseline: Sequence[Mapping]) -> float | None:
    """Share of general prompts whose answer outscores the baseline's (ties: half)."""
    if len(records) != len(baseline):
        raise ValueError(f"win_rate: {len(records)} records against {len(baseline)}")
    wins = []
    for mine, theirs in zip(records, baseline, strict=True):
        a, b = prompt_score(mine), prompt_score(theirs)
        if a is not None and b is not None:
            wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return _mean(wins)


def summarize(
    records: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, float | None]:
    """The table row of one policy's records."""
    reasoning = [r for r in records if r["kind"] in REASONING]
    generals = [r for r in records if r["kind"] in GENERAL]
    row: dict[str, float | None] = {}
    for kind in REASONING:
        for language in languages.LANGUAGES:
            picked = [
                r["accuracy"]
                for r in reasoning
                if (r["kind"], r["prompt_language"]) == (kind, language)
            ]
            if picked:
                row[f"{kind}_{'en' if language == languages.EN else 'zh'}"] = _mean(picked)
    row["format"] = _mean(r["format"] for r in reasoning)
    row["language"] = _mean(r["language"] for r in reasoning)
    for name in GENERAL:
        row[name] = _mean(r.get(name) for r in generals if r["kind"] == name)
    row["general_rule"] = _mean(r["general"] for r in generals)
    row["win_rate"] = win_rate(records, baseline) if baseline is not None else None
    row["len_reasoning"] = _mean(r["completion_len"] for r in reasoning)
    row["len_general"] = _mean(r["completion_len"] for r in generals)
    return row
