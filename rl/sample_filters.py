"""R1's rejection-sampling filters: checks on a sample's chain of thought, each configurable,
and exact / near-duplicate removal among one prompt's samples.

R1 filtered its reasoning data for chain of thought in mixed languages, long paragraphs and
code blocks (PAPER_FACTS.md). Each check returns a reason to reject, or None:

    mixed_language      the reasoning's words are not nearly all in one script
    long_paragraph      a paragraph (text between blank lines) is longer than a limit
    code_block          a fenced code block (```) inside the reasoning
    duplicate           the same response (whitespace aside) as one already kept
    near_duplicate      word-trigram Jaccard similarity to a kept one at or above a limit
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from rl.rewards import words_by_script


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Which checks run, and their limits (None switches a check off)."""

    min_script_share: float | None = 0.95  # of the reasoning's words in its main script
    max_paragraph_chars: int | None = 1200
    no_code_blocks: bool = True
    dedup: bool = True
    near_duplicate: float | None = 0.9  # word-trigram Jaccard similarity

    def __post_init__(self):
        for name in ("min_script_share", "near_duplicate"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"FilterConfig.{name} = {value!r}: must be in (0, 1] or None")
        limit = self.max_paragraph_chars
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"FilterConfig.max_paragraph_chars = {limit!r}: an int > 0 or None")


_FENCE = re.compile(r"```")
_PARAGRAPHS = re.compile(r"\n\s*\n")


def reasoning_checks(cfg: FilterConfig, reasoning: str) -> dict[str, bool]:
    """{check: passed} of the checks that look at one chain of thought."""
    out = {}
    if cfg.min_script_share is not None:
        counts = words_by_script(reasoning)
        total = sum(counts.values())
        out["mixed_language"] = not total or max(counts.values()) / total >= cfg.min_script_share
    if cfg.max_paragraph_chars is not None:
        longest = max((len(p) for p in _PARAGRAPHS.split(reasoning)), default=0)
        out["long_paragraph"] = longest <= cfg.max_paragraph_chars
    if cfg.no_code_blocks:
        out["code_block"] = _FENCE.search(reasoning) is None
    return out


def _normal(text: str) -> str:
    return " ".join(text.split())


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + 3]) for i in range(max(len(words) - 2, 1))}


def duplicate_of(cfg: FilterConfig, text: str, kept: Sequence[str]) -> str | None:
    """'duplicate' / 'near_duplicate' if `text` repeats one of `kept`, else None."""
    if cfg.dedup and any(_normal(text) == _normal(k) for k in kept):
        return "duplicate"
    if cfg.near_duplicate is not None:
        mine = _shingles(text)
        for other in kept:
            theirs = _shingles(other)
            if len(mine & theirs) / max(len(mine | theirs), 1) >= cfg.near_duplicate:
                return "near_duplicate"
    return None
