"""Document packing into fixed rows and the batch contract the train step consumes.

Pre-training rows are packed by grain's `ConcatThenSplitIterDataset` (`pack`): documents are
concatenated and cut every `seq_len + 1` tokens, so a long document continues in the next row
and rows are full (padding appears only at the end of a finite split). SFT rows (`pack_whole`)
are first-fit bins of whole conversations, padded: a conversation never loses its prompt to
the previous row. V3 packs WITHOUT masking documents from
each other; `mask_documents=True` gives the masks SFT-style sample masking needs. RoPE positions
follow the attention: continuous along the row when documents see each other, restarting at
each document when they do not.

Batch contract (numpy, B = batch size, L = seq_len):
    inputs       int32   [B, L]  row[:-1]; padding is pad_id (or 0 without one)
    targets      int32   [B, L]  row[1:]
    segment_ids  int32   [B, L]  0 = padding, documents numbered 1, 2, ... within each row
    positions    int32   [B, L]  without mask_documents: 0, 1, ..., L-1 along the row;
                                 with it: position within the document, 0 at each document
                                 start (a document continued from the previous row restarts
                                 at 0: it cannot see its beginning, which is in another row)
    loss_mask    float32 [B, L]  1 where the target is a real token; with mask_documents,
                                 also 0 where the target starts a new document; with a
                                 `trained` feature (SFT), also 0 where the target is not trained
"""

from __future__ import annotations

import grain
import numpy as np

TOKENS = "tokens"
TRAINED = "trained"  # optional per-token flag: 1 where the token is a training target
TEACHER = "teacher_"  # prefix of optional per-token teacher outputs (train/kd_cache.py)


def pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Rows of `seq_len + 1` tokens (+ `tokens_segment_ids`, `tokens_positions`) from documents.

    `ds` yields {"tokens": int32 [T]}; one extra token per row gives inputs and targets.
    """
    return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={TOKENS: seq_len + 1})


def pack_whole(
    ds: grain.IterDataset, seq_len: int, num_bins: int, extra: tuple[str, ...] = ()
) -> grain.IterDataset:
    """First-fit rows of `seq_len + 1` tokens from whole sequences {"tokens", "trained"}
    (each at most seq_len + 1 long), in `num_bins` bins at a time; rows are padded. `extra`
    features are per-token arrays [T, ...] packed along with the tokens (a teacher's top-k)."""
    length = {TOKENS: seq_len + 1, TRAINED: seq_len + 1} | dict.fromkeys(extra, seq_len + 1)
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=length, num_packing_bins=num_bins, shuffle_bins=False
    )


def to_batch(
    rows: dict[str, np.ndarray], *, mask_documents: bool, pad_id: int | None = None
) -> dict[str, np.ndarray]:
    """Packed rows {tokens, tokens_segment_ids, tokens_positions} [B, L+1] -> batch contract."""
    tokens_BxR = np.asarray(rows[TOKENS], dtype=np.int32)
    segments_BxR = np.asarray(rows[f"{TOKENS}_segment_ids"], dtype=np.int32)
    positions_BxR = np.asarray(rows[f"{TOKENS}_positions"], dtype=np.int32)
    if pad_id is not None:
        tokens_BxR = np.where(segments_BxR == 0, np.int32(pad_id), tokens_BxR)
    input_segments_BxL = segments_BxR[:, :-1]
    target_segments_BxL = segments_BxR[:, 1:]
    real_target_BxL = target_segments_BxL != 0
    if mask_documents:
        # The first token of a document is not predictable from another document's tokens.
        real_target_BxL &= target_segments_BxL == input_segments_BxL
        positions_BxL = positions_BxR[:, :-1]
    else:
        # Positions follow attention, as in Megatron's packing (reset_position_ids off): tokens
        # that attend across documents see the row as one sequence, so RoPE must see row
        # distances; restarting per document would give two visible tokens one position.
        L = input_segments_BxL.shape[1]
        positions_BxL = np.broadcast_to(np.arange(L, dtype=np.int32), input_segments_BxL.shape)
    if TRAINED in rows:
        real_target_BxL &= np.asarray(rows[TRAINED])[:, 1:] != 0
    batch = {
        "inputs": np.ascontiguousarray(tokens_BxR[:, :-1]),
        "targets": np.ascontiguousarray(tokens_BxR[:, 1:]),
        "segment_ids": np.ascontiguousarray(input_segments_BxL),
        "positions": np.ascontiguousarray(positions_BxL),
        "loss_mask": real_target_BxL.astype(np.float32),
    }
    # Per-token teacher outputs at input positions (what the teacher predicts for the target).
    for name in rows:
        if name.startswith(TEACHER) and not name.endswith(("_segment_ids", "_positions")):
            batch[name] = np.ascontiguousarray(np.asarray(rows[name])[:, :-1])
    return batch


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of input positions holding real tokens rather than padding."""
    return float(np.mean(batch["segment_ids"] != 0))
