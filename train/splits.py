"""Train / held-out splits decided by a stable hash, so no document can ever be in both."""

from __future__ import annotations

import enum
import hashlib

DEFAULT_HELDOUT_FRACTION = 0.02


class Split(enum.Enum):
    """Which side of a corpus: the training stream or the held-out evaluation set."""

    TRAIN = "train"
    HELDOUT = "heldout"


def split_of(key: str, heldout_fraction: float) -> Split:
    """The split `key` belongs to: HELDOUT for a stable `heldout_fraction` of all keys."""
    # blake2b rather than hash(): Python's str hash is salted per process.
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    unit = int.from_bytes(digest, "big") / 2**64
    return Split.HELDOUT if unit < heldout_fraction else Split.TRAIN


def check_fraction(owner: str, name: str, value: float) -> None:
    """Raise ValueError unless 0 < value < 1 (both splits must be able to be non-empty)."""
    if not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ValueError(f"{owner}.{name} must be in (0, 1), got {value!r}")
