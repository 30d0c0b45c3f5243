"""The reward-model input pipeline: preference pairs -> rendered chosen / rejected rows.

    pairs (file or given) -> hash split on the prompt -> render both responses (chat format,
      response or summary scope) -> drop over-long pairs (counted) -> shuffle (seeded, per
      epoch) -> repeat (train) -> batches of P pairs [P, 2, T] (rl/reward_model.py)

A pair cannot be truncated: the scalar head reads the end-of-sentence token that closes each
response, so a pair longer than seq_len is dropped and counted. The split is keyed on the
prompt, so held-out pairs ask questions no training pair asks. The training iterator is
grain's and checkpointable; the held-out pairs are a fixed list, scored whole at each
evaluation.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from rl.preferences import Pair, Scope, load_pairs, render_pair
from rl.reward_model import pad_rows
from train.chat import Layout
from train.conversations import BadData
from train.splits import Split, check_fraction, split_of
from train.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PairDataConfig:
    """Where pairs come from, how responses are rendered, and the batch shape."""

    path: str | None = None  # .jsonl / .parquet; None: pairs passed in by the caller
    layout: Layout = Layout.READABLE
    scope: Scope = Scope.RESPONSE
    seq_len: int = 256  # tokens of prompt + response; longer pairs are dropped
    batch_pairs: int = 8  # pairs per step (2x rows)
    on_bad: BadData = BadData.RAISE
    heldout_fraction: float = 0.1  # by a hash of the prompt
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "batch_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PairDataConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"PairDataConfig.seed must be an int >= 0, got {self.seed!r}")
        for name, kind in (("layout", Layout), ("scope", Scope), ("on_bad", BadData)):
            if not isinstance(getattr(self, name), kind):
                valid = [m.value for m in kind]
                raise ValueError(f"PairDataConfig.{name} = {getattr(self, name)!r}: one of {valid}")
        check_fraction("PairDataConfig", "heldout_fraction", self.heldout_fraction)


@dataclasses.dataclass(frozen=True)
class RenderedPair:
    """A pair's rendered responses (ids ending in end-of-sentence), margin and kind."""

    chosen: np.ndarray
    rejected: np.ndarray
    margin: float
    kind: str


@dataclasses.dataclass(frozen=True)
class PairData:
    """Rendered pairs per split and the counts of what preparing them did."""

    train: tuple[RenderedPair, ...]
    heldout: tuple[RenderedPair, ...]
    stats: dict[str, int]


def _prompt_key(pair: Pair) -> str:
    return json.dumps([m.to_dict() for m in pair.prompt], ensure_ascii=False)


def render_fitted(cfg: PairDataConfig, tokenizer: Tokenizer, pair: Pair) -> RenderedPair | None:
    """The pair rendered per cfg, or None when a response does not fit in seq_len."""
    chosen, rejected = render_pair(pair, tokenizer, layout=cfg.layout, scope=cfg.scope)
    if max(len(chosen), len(rejected)) > cfg.seq_len:
        return None
    return RenderedPair(chosen, rejected, float(pair.margin), pair.kind)


def prepare(
    cfg: PairDataConfig, tokenizer: Tokenizer, pairs: Sequence[Pair] | None = None
) -> PairData:
    """Load (cfg.path) or take `pairs`, split them on the prompt, render and fit them."""
    if (cfg.path is None) == (pairs is None):
        raise ValueError("pass exactly one of PairDataConfig.path and pairs")
    skipped: collections.Counter = collections.Counter()
    if cfg.path is not None:
        pairs, skipped = load_pairs(cfg.path, on_bad=cfg.on_bad)
    stats = {"pairs": len(pairs), "skipped_bad": sum(skipped.values()), "dropped_over_long": 0}
    splits: dict[Split, list[RenderedPair]] = {Split.TRAIN: [], Split.HELDOUT: []}
    for pair in pairs:
        rendered = render_fitted(cfg, tokenizer, pair)
        if rendered is None:
            stats["dropped_over_long"] += 1
            continue
        splits[split_of(_prompt_key(pair), cfg.heldout_fraction)].append(rendered)
    for split, items in splits.items():
        if not items:
            raise ValueError(
                f"no {split.value} pairs left after splitting and fitting to seq_len "
                f"{cfg.seq_len} ({stats}); add pairs, raise seq_len or change heldout_fraction"
            )
        stats[f"{split.value}_pairs"] = len(items)
    stats |= {f"skipped: {reason}": count for reason, count in skipped.items()}
    return PairData(tuple(splits[Split.TRAIN]), tuple(splits[Split.HELDOUT]), stats)


def pair_batch(pairs: Sequence[RenderedPair], seq_len: int, size: int | None = None) -> dict:
    """inputs / positions / segment_ids [P, 2, seq_len] (chosen, rejected), margin and weight
    [P]; with `size`, padded to `size` pairs of empty rows (weight 0)."""
    size = len(pairs) if size is None else size
    empty = np.zeros(0, np.int32)
    pad = size - len(pairs)
    rows = [row for p in pairs for row in (p.chosen, p.rejected)] + [empty] * (2 * pad)
    batch = {k: v.reshape(size, 2, seq_len) for k, v in pad_rows(rows, seq_len).items()}
    batch["margin"] = np.asarray([p.margin for p in pairs] + [0.0] * pad, np.float32)
    batch["weight"] = np.asarray([1.0] * len(pairs) + [0.0] * pad, np.float32)
    return batch


def train_iterator(
    cfg: PairDataConfig, data: PairData, *, shard_index: int = 0, shard_count: int = 1
) -> grain.DatasetIterator:
    """Endless batches of training pairs, reshuffled each epoch; checkpointable."""
    ds = grain.MapDataset.source(list(data.train)).shuffle(seed=cfg.seed).repeat(None)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    batches = ds.batch(cfg.batch_pairs, drop_remainder=True, batch_fn=list)
    return iter(batches.map(lambda pairs: pair_batch(pairs, cfg.seq_len)))


def eval_batches(
    cfg: PairDataConfig, pairs: Sequence[RenderedPair]
) -> Iterator[tuple[dict, list[str]]]:
    """(batch, kinds) over every pair, in order, the last batch padded to the same shape."""
    P = cfg.batch_pairs
    for start in range(0, len(pairs), P):
        chunk = pairs[start : start + P]
        yield pair_batch(chunk, cfg.seq_len, P), [p.kind for p in chunk]
