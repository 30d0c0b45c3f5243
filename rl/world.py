"""The embedded world the R1 pipeline trains in: reasoning prompts in two languages, general
prompts, and the base corpus, all from hash splits (held-out prompts are in no stage's data).

    heldout = world.reasoning_tasks(Split.HELDOUT, 200, 0)  # arithmetic, countdown, code
    chat = world.as_chat(heldout + world.general_tasks(Split.HELDOUT, 60, 0), tokenizer)

A task is a dict with one set of columns for every kind (rl/task_mix.uniform): `question`,
`kind` (arithmetic, countdown, code: rule-checked; helpful, harmless: general prompts scored
by reward models), `language` ("latin" / "cjk": what the reasoning should be written in),
the rule rewards' columns (`answer`; `numbers`, `target`; `tests`) and `general` (a general
prompt's rule-check fields, rl/general.py). `as_chat` and `as_r1_zero` add the `prompt` a
policy sees: a chat turn (`prompt_ids`, rendered) or R1-Zero's template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rl import code_tasks, general, languages, tasks
from rl.task_mix import uniform
from train import arithmetic
from train.chat import Layout, Message, Role, render
from train.splits import Split
from train.tokenizer import Tokenizer

REASONING = ("arithmetic", "countdown", "code")
GENERAL = (general.HELPFUL, general.HARMLESS)
DEFAULT_MIX = {"arithmetic": 0.5, "countdown": 0.3, "code": 0.2}
ADD_SUB = (arithmetic.Operation.ADD, arithmetic.Operation.SUB)


def _check_mix(mix: Mapping[str, float]) -> dict[str, float]:
    if not mix or set(mix) - set(REASONING) or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"mix must map some of {REASONING} to weights >= 0, got {dict(mix)!r}")
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def reasoning_tasks(
    split: Split,
    count: int,
    seed: int,
    *,
    mix: Mapping[str, float] = DEFAULT_MIX,
    chinese_fraction: float = 0.5,
    max_digits: int = 2,
    operations: tuple[arithmetic.Operation, ...] = ADD_SUB,
) -> list[dict]:
    """`count` rule-checked tasks of `split` in the mix's proportions; `chinese_fraction` of
    the arithmetic and countdown ones are asked in Chinese (code is asked in English). The
    code pool is small (about 110 TRAIN and 22 HELDOUT problems): beyond it, code problems
    repeat."""
    shares = _check_mix(mix)
    if not 0 <= chinese_fraction <= 1:
        raise ValueError(f"chinese_fraction must be in [0, 1], got {chinese_fraction!r}")
    rng = np.random.default_rng([seed, 2])
    counts = {k: round(count * shares.get(k, 0.0)) for k in REASONING}
    counts["arithmetic"] += count - sum(counts.values())
    out: list[dict] = []
    for p in arithmetic.generate(
        split, counts["arithmetic"], seed, max_digits=max_digits, operations=operations
    ):
        language = languages.ZH if rng.random() < chinese_fraction else languages.EN
        out.append({
            "question": languages.arithmetic_question(p.question, language),
            "kind": "arithmetic", "language": language, "answer": p.answer,
        })  # fmt: skip
    if counts["countdown"]:
        for t in tasks.countdown_tasks(split, counts["countdown"], seed, num_numbers=3):
            language = languages.ZH if rng.random() < chinese_fraction else languages.EN
            out.append({
                "question": languages.countdown_question(t["numbers"], t["target"], language),
                "kind": "countdown", "language": language, "numbers": t["numbers"],
                "target": t["target"],
            })  # fmt: skip
    if counts["code"]:
        for t in code_tasks.code_tasks(split, counts["code"], seed, repeat=True):
            out.append({
                "question": t["question"], "kind": "code", "language": languages.EN,
                "tests": t["tests"],
            })  # fmt: skip
    order = rng.permutation(len(out))
    return [COLUMNS | out[i] for i in order]


# Every task's columns, so reasoning and general tasks mix in one batch.
COLUMNS = {"answer": None, "numbers": None, "target": None, "tests": None, "general": None}


def general_tasks(split: Split, count: int, seed: int) -> list[dict]:
    """`count` general prompts of `split` (rl/general.py), kind `helpful` or `harmless`."""
    out = []
    for p in general.prompts(split, count, seed):
        out.append({
            **COLUMNS, "question": p["question"], "kind": p["aspect"],
            "language": languages.EN, "general": p,
        })  # fmt: skip
    return out


def as_chat(
    items: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, layout: Layout = Layout.READABLE
) -> list[dict]:
    """The tasks asked as one chat user turn + the generation prompt."""
    out = []
    for item in uniform(items):
        turn = [Message(Role.USER, item["question"])]
        ids = render(turn, tokenizer, layout=layout, add_generation_prompt=True).ids.tolist()
        out.append(item | {"prompt": tokenizer.decode(ids), "prompt_ids": ids})
    return out


def as_r1_zero(items: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The tasks asked in R1-Zero's template (rl/tasks.py)."""
    return [item | {"prompt": tasks.r1_zero_prompt(item["question"])} for item in uniform(items)]


def general_documents(count: int, seed: int) -> list[str]:
    """Base-corpus documents of TRAIN general prompts, each answered well or badly at even
    odds (rl/general.pairs): the base learns the words, not which answers are preferred."""
    rng = np.random.default_rng([seed, 3])
    found = general.pairs(Split.TRAIN, count // 2 + 1, seed, general.HELPFUL)
    found += general.pairs(Split.TRAIN, count - count // 2 + 1, seed, general.HARMLESS)
    docs = []
    for pair in found[:count]:
        reply = pair.chosen if rng.random() < 0.5 else pair.rejected
        docs.append(f"Q: {pair.prompt[-1].content}\nA: {reply.content}")
    return [docs[i] for i in rng.permutation(len(docs))]
