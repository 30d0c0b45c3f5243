"""The pre-training input pipeline: documents -> tokens + FIM -> packed rows -> batches (grain).

    docs per source -> shuffle (seeded, reshuffled each epoch) -> repeat (train only)
      -> mix by weight -> tokenize + FIM (random_map: per-record seeds from the record index)
      -> [worker processes] -> pack into seq_len + 1 rows -> batch -> batch contract

Everything up to tokenization is index-based, so output depends on the seed only, never on
the number of workers: workers do the tokenization (the expensive part) and packing runs
after them in the main process. The batch contract is documented in train/packing.py.

The iterator's state is small and checkpointable, for the loop's orbax CheckpointManager:

    it = make_iterator(cfg, tokenizer, Split.TRAIN)
    mngr.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it)))

or by hand with `it.get_state()` (a JSON-serializable dict) and `it.set_state(state)`. A restored
iterator yields exactly the batches the uninterrupted one would have; a state restores into an
iterator built from the same config (num_workers included).

Workers are spawned processes: a script that sets num_workers > 0 needs the usual
`if __name__ == "__main__":` guard (`python -m experiments ...` has it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import grain
import numpy as np

from train import fim, packing
from train.sources import ArithmeticSource, FilesSource, Source, StdlibSource, load_documents
from train.splits import Split
from train.tokenizer import FIM_SPECIALS, Tokenizer, train_bpe

TOKENIZER_FILE = "tokenizer.json"
_EVAL_SEED = 0  # held-out batches must not change with the training seed


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Sources and their mixture, row shape, FIM, and how the pipeline runs.

    Source weights are fractions of training BYTES (about tokens), not of documents: a 20 KB
    module and a 200-byte arithmetic problem count by their size. Weight 0 turns a source off.
    """

    stdlib: StdlibSource = dataclasses.field(default_factory=StdlibSource)
    arithmetic: ArithmeticSource = dataclasses.field(default_factory=ArithmeticSource)
    files: FilesSource = dataclasses.field(default_factory=FilesSource)
    seq_len: int = 256  # tokens per row seen by the model (rows hold seq_len + 1)
    batch_size: int = 8
    fim_rate: float = fim.DEFAULT_FIM_RATE  # V3: 0.1, PSM
    mask_documents: bool = False  # V3 pre-training: False; SFT sample masking: True
    seed: int = 0
    num_workers: int = 0  # tokenizing processes for TRAIN; 0 = in the calling process
    worker_buffer_size: int = 16  # documents each worker keeps ready
    read_threads: int = 1  # threads per process reading + tokenizing documents

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "worker_buffer_size", "read_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        for name in ("seed", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DataConfig.{name} must be an int >= 0, got {value!r}")
        fim.check_rate("DataConfig", self.fim_rate)
        if not self.sources():
            raise ValueError(
                "DataConfig: every source has weight 0; set stdlib.weight, arithmetic.weight "
                "or files.weight (with files.path) > 0"
            )

    def sources(self) -> tuple[Source, ...]:
        """The sources with weight > 0, in a fixed order."""
        return tuple(s for s in (self.stdlib, self.arithmetic, self.files) if s.weight > 0)


@functools.lru_cache(maxsize=8)
def _builtin_documents(source: StdlibSource | ArithmeticSource, split: Split) -> tuple[str, ...]:
    return tuple(load_documents(source, split))


def documents(source: Source, split: Split) -> list[str]:
    """`load_documents`, cached for the built-in sources (user files are re-read each call)."""
    if isinstance(source, FilesSource):
        return load_documents(source, split)
    return list(_builtin_documents(source, split))


def _derive_seed(*parts: object) -> int:
    """A 32-bit seed from a seed and tags, stable across processes and Python versions."""
    key = "/".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big")


def _mean_bytes(docs: list[str]) -> float:
    return max(1.0, sum(len(d.encode("utf-8")) for d in docs) / len(docs))


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """random_map transform: document text -> {"tokens": int32 [T]} with FIM at `fim_rate`."""

    tokenizer: Tokenizer
    fim_rate: float

    def __call__(self, text: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = fim.document_tokens(text, self.tokenizer, rng, fim_rate=self.fim_rate)
        return {packing.TOKENS: tokens}


def _train_documents(cfg: DataConfig) -> grain.MapDataset:
    parts, weights = [], []
    for source in cfg.sources():
        docs = documents(source, Split.TRAIN)
        if not docs:
            raise ValueError(f"{type(source).__name__} has no training documents: {source}")
        seed = _derive_seed(cfg.seed, "shuffle", source.kind.value)
        # shuffle before repeat: every epoch is a fresh permutation (grain reseeds per epoch).
        parts.append(grain.MapDataset.source(docs).shuffle(seed=seed).repeat(None))
        weights.append(source.weight / _mean_bytes(docs))
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, weights=[w / min(weights) for w in weights])


def _heldout_documents(cfg: DataConfig) -> grain.MapDataset:
    # Every held-out document exactly once; weights do not apply. The fixed shuffle (not the
    # training seed) makes any prefix, such as the loop's first N eval batches, a sample of
    # all sources rather than of the first one.
    held_out = [documents(s, Split.HELDOUT) for s in cfg.sources()]
    parts = [grain.MapDataset.source(docs) for docs in held_out if docs]
    if not parts:
        raise ValueError("no held-out documents in any source; raise the sources' heldout_fraction")
    return grain.MapDataset.concatenate(parts).shuffle(seed=_EVAL_SEED)


def document_stream(
    cfg: DataConfig, split: Split, *, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
    """Document texts in pipeline order: TRAIN an endless shuffled mixture, HELDOUT each once.

    With `shard_count` > 1 (one shard per host) shard `shard_index` gets every
    `shard_count`-th document, so hosts never read the same one.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    docs = _train_documents(cfg) if split is Split.TRAIN else _heldout_documents(cfg)
    return docs if shard_count == 1 else docs[shard_index::shard_count]


def make_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: Split,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Batches (the contract in train/packing.py); TRAIN is infinite, HELDOUT one finite pass.

    Multi-host: pass `shard_index=jax.process_index(), shard_count=jax.process_count()`;
    each host then yields its own `batch_size` rows per batch.
    """
    if cfg.fim_rate > 0:
        tokenizer.require(*FIM_SPECIALS)
    train = split is Split.TRAIN
    docs = document_stream(cfg, split, shard_index=shard_index, shard_count=shard_count)
    map_seed = _derive_seed(cfg.seed if train else _EVAL_SEED, "fim", split.value)
    ds = docs.random_map(_Tokenize(tokenizer, cfg.fim_rate), seed=map_seed)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads))
    # The held-out split is small and read often (every eval): worker start-up would cost more
    # than it saves, so it is always tokenized in the calling process.
    if cfg.num_workers > 0 and train:
        # Worker processes start with absl flags unparsed; grain reads flags there.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size
        )
        ds = ds.mp_prefetch(options)
    ds = packing.pack(ds, cfg.seq_len)
    if train:
        ds = ds.batch(cfg.batch_size, drop_remainder=True)
    else:
        # The last batch is padded with empty rows (segment 0, loss_mask 0): shapes stay static.
        pad = functools.partial(grain.experimental.batch_and_pad, batch_size=cfg.batch_size)
        ds = ds.batch(cfg.batch_size, batch_fn=pad)
    contract = functools.partial(
        packing.to_batch, mask_documents=cfg.mask_documents, pad_id=tokenizer.pad_id
    )
    return ds.map(contract)


def make_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: Split,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """A fresh iterator over `make_dataset` (checkpointable: get_state / set_state).

    A state restores only into an iterator of the same config (num_workers included).
    """
    ds = make_dataset(cfg, tokenizer, split, shard_index=shard_index, shard_count=shard_count)
    return iter(ds)


def tokenizer_sample(cfg: DataConfig, sample_bytes: int) -> list[str]:
    """A seeded sample of training documents, about `sample_bytes` split by source weight."""
    total_weight = sum(s.weight for s in cfg.sources())
    sample = []
    for source in cfg.sources():
        docs = documents(source, Split.TRAIN)
        budget = sample_bytes * source.weight / total_weight
        rng = np.random.default_rng(_derive_seed(cfg.seed, "tokenizer", source.kind.value))
        taken = 0
        for i in rng.permutation(len(docs)):
            if taken >= budget:
                break
            sample.append(docs[i])
            taken += len(docs[i].encode("utf-8"))
    return sample


def prepare_tokenizer(
    cfg: DataConfig,
    run_dir: str | os.PathLike,
    *,
    vocab_size: int,
    sample_bytes: int = 4 << 20,
) -> Tokenizer:
    """Load run_dir/tokenizer.json if present, else train a BPE on a corpus sample and save it.

    An existing file wins (resuming a run, or a tokenizer put there on purpose, e.g.
    DeepSeek's): size the model's vocab from `tokenizer.vocab_size`, not from `vocab_size`.
    """
    if not isinstance(sample_bytes, int) or sample_bytes <= 0:
        raise ValueError(f"sample_bytes must be a positive int, got {sample_bytes!r}")
    path = Path(run_dir) / TOKENIZER_FILE
    if path.exists():
        return Tokenizer.load(path)
    tokenizer = train_bpe(tokenizer_sample(cfg, sample_bytes), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)
    return tokenizer
