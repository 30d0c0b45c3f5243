"""Conversations from JSONL or Parquet files in the usual messages layout.

Each JSONL line (each Parquet row) holds one conversation:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "...",
                   "reasoning_content": "..."  (optional, assistant turns)}, ...]}

Blank JSONL lines are ignored. A bad record (not JSON, no `messages` list, an unknown role,
empty content, no assistant turn) is an error naming the file and line; with
`on_bad=BadData.SKIP` it is skipped instead and counted by reason.
"""

from __future__ import annotations

import collections
import enum
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from train.chat import Conversation, Message, check_conversation

T = TypeVar("T")


class BadData(enum.Enum):
    """What a malformed record does."""

    RAISE = "raise"  # stop with an error naming the file and line
    SKIP = "skip"  # drop it and count it


def records(path: Path) -> Iterator[tuple[int, object]]:
    """(line or row number from 1, record or the JSON error) in file order."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
        yield from enumerate(rows, start=1)
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, ValueError(f"not JSON ({e})")


def parse_message(value: object) -> Message:
    """A Message from a record's {role, content, reasoning_content}; ValueError if malformed."""
    if isinstance(value, Mapping):  # Parquet fills absent struct fields with None
        value = {k: v for k, v in value.items() if v is not None}
    return Message.from_dict(value)


def parse_conversation(record: object) -> list[Message]:
    """A checked conversation from one record ({"messages": [...]}); ValueError if malformed."""
    if isinstance(record, ValueError):
        raise record
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("expected an object with a 'messages' list")
    messages = [parse_message(m) for m in record["messages"]]
    check_conversation(messages)
    return messages


def load_records(
    path: str | os.PathLike,
    parse: Callable[[object], T],
    *,
    what: str,
    on_bad: BadData = BadData.RAISE,
) -> tuple[list[T], collections.Counter]:
    """(parse(record) for each good record, skipped reasons -> counts) from a .jsonl or
    .parquet file of `what` (named in errors); `parse` raises ValueError on a bad record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: {what} must be a .jsonl or .parquet file")
    items, skipped = [], collections.Counter()
    for number, record in records(path):
        try:
            items.append(parse(record))
        except ValueError as e:
            if on_bad is BadData.RAISE:
                hint = " (on_bad=skip drops such records and counts them)"
                raise ValueError(f"{path}:{number}: {e}{hint}") from None
            skipped["not JSON" if isinstance(record, ValueError) else str(e)] += 1
    if not items:
        raise ValueError(f"{path}: no usable {what} ({sum(skipped.values())} skipped)")
    return items, skipped


def load_conversations(
    path: str | os.PathLike, *, on_bad: BadData = BadData.RAISE
) -> tuple[list[Conversation], collections.Counter]:
    """(conversations, skipped reasons -> counts) from a .jsonl or .parquet file."""
    return load_records(path, parse_conversation, what="conversations", on_bad=on_bad)


def save_conversations(conversations: list[Conversation], path: str | os.PathLike) -> None:
    """Write conversations as JSONL (to a temporary file, then renamed)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for conversation in conversations:
            record = {"messages": [m.to_dict() for m in conversation]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
