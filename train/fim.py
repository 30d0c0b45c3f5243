"""Fill-in-the-middle (PSM) at the document level, applied before packing (V3: rate 0.1).

A FIM document is split at two random character positions into prefix / middle / suffix and
becomes

    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>

so the model learns to predict the middle from both sides with plain next-token prediction. The
pieces are tokenized separately: a token never straddles a cut. Other documents become
`tokens + [eos]`.
"""

from __future__ import annotations

import numpy as np

from train.tokenizer import FIM_SPECIALS, Tokenizer

DEFAULT_FIM_RATE = 0.1


def check_rate(owner: str, rate: float) -> None:
    """Raise ValueError naming `owner.fim_rate` unless 0 <= rate <= 1."""
    if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{owner}.fim_rate must be in [0, 1], got {rate!r}")


def split_points(length: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two sorted cut positions in [0, length], uniform over characters."""
    i, j = sorted(int(x) for x in rng.integers(0, length + 1, size=2))
    return i, j


def fim_tokens(text: str, tokenizer: Tokenizer, rng: np.random.Generator) -> list[int]:
    """`text` in PSM form at random character cuts, ending in eos."""
    i, j = split_points(len(text), rng)
    prefix, middle, suffix = tokenizer.encode_batch([text[:i], text[i:j], text[j:]])
    return [
        tokenizer.fim_begin_id,
        *prefix,
        tokenizer.fim_hole_id,
        *suffix,
        tokenizer.fim_end_id,
        *middle,
        tokenizer.eos_id,
    ]


def document_tokens(
    text: str, tokenizer: Tokenizer, rng: np.random.Generator, *, fim_rate: float = DEFAULT_FIM_RATE
) -> np.ndarray:
    """Token ids [T] int32 of one document: FIM with probability `fim_rate`, else text + eos."""
    # Draw the coin even at rate 0 or 1 so the rng stream does not depend on the rate's value.
    use_fim = rng.random() < fim_rate
    if use_fim:
        tokenizer.require(*FIM_SPECIALS)
        ids = fim_tokens(text, tokenizer, rng)
    else:
        ids = [*tokenizer.encode(text), tokenizer.eos_id]
    return np.asarray(ids, dtype=np.int32)
