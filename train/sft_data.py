"""The SFT input pipeline: conversations -> chat rendering -> packed rows with sample masking.

    conversations (file or given) -> hash split -> render (ids + trained mask)
      -> over-long: truncate or drop (counted) -> shuffle (seeded, per epoch) -> repeat (train)
      -> first-fit packing of whole conversations -> batch -> batch contract (train/packing.py)

V3's SFT packs several samples per row with sample masking: attention never crosses a
conversation and positions restart at each one, so a packed row computes what each of its
conversations would alone. Rendering is done once, up front, which gives exact counts of
what was truncated or dropped; the iterator is grain's and checkpointable like pre-training's.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import json
from collections.abc import Sequence

import grain
import numpy as np

from train import packing
from train.chat import Conversation, Layout, Rendered, render
from train.conversations import BadData, load_conversations
from train.splits import Split, check_fraction, split_of
from train.tokenizer import Tokenizer


class OverLong(enum.Enum):
    """What a conversation longer than a row (seq_len + 1 tokens) does."""

    TRUNCATE = "truncate"  # keep its first seq_len + 1 tokens (its end is not trained)
    DROP = "drop"


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """Where conversations come from, how they are rendered, and the row shape."""

    path: str | None = None  # .jsonl / .parquet; None: conversations passed in by the caller
    layout: Layout = Layout.THINK
    seq_len: int = 512  # tokens per row seen by the model (rows hold seq_len + 1)
    batch_size: int = 8
    over_long: OverLong = OverLong.TRUNCATE
    on_bad: BadData = BadData.RAISE
    heldout_fraction: float = 0.05  # by a hash of the conversation's text
    packing_bins: int = 8  # rows filled at a time (first fit); more bins, less padding
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "packing_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SFTDataConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SFTDataConfig.seed must be an int >= 0, got {self.seed!r}")
        for name, kind in (("layout", Layout), ("over_long", OverLong), ("on_bad", BadData)):
            if not isinstance(getattr(self, name), kind):
                valid = [m.value for m in kind]
                raise ValueError(f"SFTDataConfig.{name} = {getattr(self, name)!r}: one of {valid}")
        check_fraction("SFTDataConfig", "heldout_fraction", self.heldout_fraction)


@dataclasses.dataclass(frozen=True)
class SFTData:
    """Rendered conversations per split and the counts of what preparing them did."""

    train: tuple[Rendered, ...]
    heldout: tuple[Rendered, ...]
    stats: dict[str, int]
    # Per split, per conversation: {name: array [T, ...]} packed with its tokens (a teacher's
    # precomputed top-k, train/kd_cache.py); None: none.
    teacher: dict[Split, tuple[dict[str, np.ndarray], ...]] | None = None

    def split(self, split: Split) -> tuple[Rendered, ...]:
        return self.train if split is Split.TRAIN else self.heldout


def _fit(rendered: Rendered, row: int, over_long: OverLong) -> Rendered | None:
    """`rendered` within `row` tokens, or None (dropped; also when nothing trained is left)."""
    if len(rendered) > row:
        if over_long is OverLong.DROP:
            return None
        rendered = Rendered(rendered.ids[:row], rendered.trained[:row])
    return rendered if rendered.trained[1:].any() else None


def prepare(
    cfg: SFTDataConfig, tokenizer: Tokenizer, conversations: Sequence[Conversation] | None = None
) -> SFTData:
    """Load (cfg.path) or take `conversations`, split, render and fit them to rows."""
    if (cfg.path is None) == (conversations is None):
        raise ValueError("pass exactly one of SFTDataConfig.path and conversations")
    skipped: collections.Counter = collections.Counter()
    if cfg.path is not None:
        conversations, skipped = load_conversations(cfg.path, on_bad=cfg.on_bad)
    stats = {"conversations": len(conversations), "skipped_bad": sum(skipped.values())}
    stats |= {"truncated": 0, "dropped_over_long": 0, "dropped_untrained": 0}
    row = cfg.seq_len + 1
    splits: dict[Split, list[Rendered]] = {Split.TRAIN: [], Split.HELDOUT: []}
    for conversation in conversations:
        key = json.dumps([m.to_dict() for m in conversation], ensure_ascii=False)
        rendered = render(conversation, tokenizer, layout=cfg.layout)
        fitted = _fit(rendered, row, cfg.over_long)
        if fitted is None:
            long = len(rendered) > row and cfg.over_long is OverLong.DROP
            stats["dropped_over_long" if long else "dropped_untrained"] += 1
            continue
        stats["truncated"] += len(fitted) < len(rendered)
        splits[split_of(key, cfg.heldout_fraction)].append(fitted)
    for split, items in splits.items():
        if not items:
            raise ValueError(
                f"no {split.value} conversations left after splitting and fitting to "
                f"seq_len {cfg.seq_len} ({stats}); add data or change heldout_fraction"
            )
        stats[f"{split.value}_conversations"] = len(items)
        stats[f"{split.value}_trained_tokens"] = int(sum(r.trained[1:].sum() for r in items))
    stats |= {f"skipped: {reason}": count for reason, count in skipped.items()}
    return SFTData(tuple(splits[Split.TRAIN]), tuple(splits[Split.HELDOUT]), stats)


def _features(item) -> dict[str, np.ndarray]:
    rendered, extra = item if isinstance(item, tuple) else (item, {})
    return {
        packing.TOKENS: rendered.ids,
        packing.TRAINED: rendered.trained.astype(np.int32),
        **extra,
    }


def _rows(
    cfg: SFTDataConfig, conversations: grain.MapDataset, extra: tuple[str, ...] = ()
) -> grain.IterDataset:
    """First-fit packed rows of rendered conversations (with their `extra` features), in
    order."""
    ds = conversations.map(_features).to_iter_dataset()
    return packing.pack_whole(ds, cfg.seq_len, cfg.packing_bins, extra)


def make_iterator(
    cfg: SFTDataConfig,
    data: SFTData,
    tokenizer: Tokenizer,
    split: Split,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """Batches of packed conversations: TRAIN endless and reshuffled each epoch, HELDOUT one
    pass (its last batch padded with empty rows). Checkpointable (get_state / set_state)."""
    items, extra = list(data.split(split)), ()
    if data.teacher is not None:
        items = list(zip(items, data.teacher[split], strict=True))
        extra = tuple(data.teacher[split][0]) if data.teacher[split] else ()
    ds = grain.MapDataset.source(items)
    if split is Split.TRAIN:
        ds = ds.shuffle(seed=cfg.seed).repeat(None)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    rows = _rows(cfg, ds, extra)
    if split is Split.TRAIN:
        batches = rows.batch(cfg.batch_size, drop_remainder=True)
    else:
        pad = functools.partial(grain.experimental.batch_and_pad, batch_size=cfg.batch_size)
        batches = rows.batch(cfg.batch_size, batch_fn=pad)
    contract = functools.partial(packing.to_batch, mask_documents=True, pad_id=tokenizer.pad_id)
    return iter(batches.map(contract))


def rows_per_epoch(cfg: SFTDataConfig, data: SFTData) -> int:
    """Rows one pass over the training conversations packs into (in the first epoch's order)."""
    ds = grain.MapDataset.source(list(data.train)).shuffle(seed=cfg.seed)
    return sum(1 for _ in _rows(cfg, ds))
