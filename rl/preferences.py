"""Preference pairs for reward models: from JSONL / Parquet files or generated for the
embedded tasks, rendered in the chat format for scoring.

A file record is one pair, in the layout TRL's reward trainer reads:

    {"prompt": "question" | [messages], "chosen": "answer" | {assistant message},
     "rejected": ... , "margin": 0.5 (optional)}

where an assistant message is {"role": "assistant", "content": ..., "reasoning_content": ...}.
Bad records are errors naming the file and line, or skipped and counted (`BadData.SKIP`).

The generated pairs contrast a correct worked solution (rl/cold_start.py) with a worse
response to the same question, one kind per pair: a confident mistake (the same lines and a
final check claiming "correct", but a wrong answer: only the arithmetic tells, so no surface
cue gives it away), a truncated response (no answer, no format), a format-broken one (the
right answer without the reasoning tags), and a rambling-but-correct one (chosen: the concise
solution). Problems come
from the tasks' hash splits, so held-out pairs ask unseen questions.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence

import numpy as np

from rl.cold_start import arithmetic_sample
from train import arithmetic
from train.chat import Layout, Message, Role, check_conversation, render
from train.conversations import BadData, load_records, parse_message
from train.splits import Split
from train.tokenizer import Tokenizer

KINDS = ("mistake", "truncated", "format", "rambling")


class Scope(enum.Enum):
    """What a reward model reads of a response (R1's stage 4: helpfulness on the summary,
    harmlessness on everything)."""

    RESPONSE = "response"  # reasoning and summary
    SUMMARY = "summary"  # only the answer after </think>


@dataclasses.dataclass(frozen=True)
class Pair:
    """A prompt (the turns before the response) and two assistant responses to it."""

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    margin: float = 0.0
    kind: str = ""

    def __post_init__(self):
        check_conversation(self.prompt, needs_assistant=False)
        if self.prompt[-1].role is not Role.USER:
            raise ValueError("a pair's prompt must end with a user turn")
        for name in ("chosen", "rejected"):
            if getattr(self, name).role is not Role.ASSISTANT:
                raise ValueError(f"{name} must be an assistant message")
        if not isinstance(self.margin, int | float) or not np.isfinite(self.margin):
            raise ValueError(f"margin must be a finite number, got {self.margin!r}")


def _response(value: object, name: str) -> Message:
    if isinstance(value, str):
        return Message(Role.ASSISTANT, value)
    if isinstance(value, Mapping):
        return parse_message(value)
    raise ValueError(f"{name} must be a string or an assistant message, got {type(value).__name__}")


def parse_pair(record: object) -> Pair:
    """A checked Pair from one record; ValueError naming what is wrong."""
    if isinstance(record, ValueError):
        raise record
    if not isinstance(record, dict):
        raise ValueError("expected an object with prompt, chosen and rejected")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"missing {missing}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        turns = (Message(Role.USER, prompt),)
    elif isinstance(prompt, list):
        turns = tuple(parse_message(m) for m in prompt)
    else:
        raise ValueError("prompt must be a string or a list of messages")
    margin = record.get("margin")
    return Pair(
        turns,
        _response(record["chosen"], "chosen"),
        _response(record["rejected"], "rejected"),
        0.0 if margin is None else margin,
    )


def load_pairs(
    path: str | os.PathLike, *, on_bad: BadData = BadData.RAISE
) -> tuple[list[Pair], collections.Counter]:
    """(pairs, skipped reasons -> counts) from a .jsonl or .parquet file."""
    return load_records(path, parse_pair, what="preference pairs", on_bad=on_bad)


def _worse(good: Message, problem: arithmetic.ArithmeticProblem, kind: str, rng) -> Message:
    """A worse response than `good` to `problem`, of one of KINDS."""
    lines = good.reasoning.split("\n")
    if kind == "mistake":  # a confident wrong answer: same lines, a check that lies
        wrong = problem.answer + int(rng.choice([-10, -1, 1, 10]))
        a, op, b = problem.question.split(" ")
        inverse = "-" if op == "+" else "+"
        lie = f"check: {wrong} {inverse} {b} = {a}, which is {a}: correct."
        body = [*lines[:-2], f"{problem.question} = {wrong}", lie]
        return Message(Role.ASSISTANT, str(wrong), reasoning="\n".join(body))
    if kind == "truncated":  # cut off mid-reasoning: no answer, no closing tag
        return Message(Role.ASSISTANT, "\n".join(lines[: max(len(lines) // 2, 1)]))
    if kind == "format":  # the right answer, the reasoning outside the tags
        return Message(Role.ASSISTANT, f"{good.reasoning}\nThe answer is {good.content}.")
    # rambling: correct, but every check said three times over
    body = [line for line in lines for _ in range(3 if line.startswith("check") else 1)]
    body.insert(1, "Let me think about this carefully, step by step, once more.")
    return Message(Role.ASSISTANT, good.content, reasoning="\n".join(body))


def preference_pairs(
    split: Split,
    count: int,
    seed: int,
    *,
    kinds: Sequence[str] = KINDS,
    max_digits: int = 2,
    operations: tuple[arithmetic.Operation, ...] = (
        arithmetic.Operation.ADD,
        arithmetic.Operation.SUB,
    ),
) -> list[Pair]:
    """`count` pairs on distinct questions of `split`, kinds in turn."""
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    rng = np.random.default_rng(seed)
    problems = arithmetic.generate(
        split, 3 * count + 10, seed, max_digits=max_digits, operations=operations
    )
    pairs, seen = [], set()
    for problem in problems:
        if len(pairs) == count:
            break
        if problem.question in seen:
            continue
        seen.add(problem.question)
        question, good = arithmetic_sample(problem, rng, mistake_rate=0.0)
        kind = kinds[len(pairs) % len(kinds)]
        pairs.append(Pair((question,), good, _worse(good, problem, kind, rng), kind=kind))
    if len(pairs) < count:
        raise ValueError(
            f"only {len(pairs)} distinct {split.value} questions for {count} pairs; raise "
            "max_digits or ask for fewer"
        )
    return pairs


def render_pair(
    pair: Pair,
    tokenizer: Tokenizer,
    *,
    layout: Layout = Layout.READABLE,
    scope: Scope = Scope.RESPONSE,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of prompt + chosen and prompt + rejected, each ending in end-of-sentence (the
    token a scalar head reads); `Scope.SUMMARY` leaves the reasoning out."""

    def ids(response: Message) -> np.ndarray:
        if scope is Scope.SUMMARY:
            response = Message(Role.ASSISTANT, response.content)
        return render([*pair.prompt, response], tokenizer, layout=layout).ids

    return ids(pair.chosen), ids(pair.rejected)
