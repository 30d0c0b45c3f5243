"""Byte-level BPE tokenizer with DeepSeek's special tokens, on top of HF `tokenizers`.

`train_bpe` trains one from text (V3: byte-level BPE, 128K vocab; here any size), and
`Tokenizer.load` reads any `tokenizer.json`, DeepSeek's own included: special tokens are found
by their content, not by a fixed id.

Special tokens are never produced from ordinary text: `encode("<｜end▁of▁sentence｜>")` gives the
bytes of that string, so a document that quotes a sentinel cannot forge a document boundary or
a FIM hole. Pipelines insert special ids themselves.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers


class Special(enum.Enum):
    """Special tokens by role; the value is the token's content (DeepSeek's spelling).

    `train_bpe` gives them ids 0, 1, 2, ... in this order (bos 0, eos 1, pad 2, as in V3).
    DeepSeek has no system-role token (its chat template puts the system prompt right after
    bos); `<｜System｜>` is ours, spelled like the other roles.
    """

    BOS = "<｜begin▁of▁sentence｜>"
    EOS = "<｜end▁of▁sentence｜>"
    PAD = "<｜▁pad▁｜>"
    FIM_BEGIN = "<｜fim▁begin｜>"
    FIM_HOLE = "<｜fim▁hole｜>"
    FIM_END = "<｜fim▁end｜>"
    USER = "<｜User｜>"
    ASSISTANT = "<｜Assistant｜>"
    SYSTEM = "<｜System｜>"
    THINK_BEGIN = "<think>"
    THINK_END = "</think>"
    ANSWER_BEGIN = "<answer>"
    ANSWER_END = "</answer>"


FIM_SPECIALS = (Special.FIM_BEGIN, Special.FIM_HOLE, Special.FIM_END)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens it carries."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        source: str = "<memory>",
        names: Mapping[Special, str] | None = None,
    ):
        self._backend = backend
        self._source = source
        self._names = {s: (names or {}).get(s, s.value) for s in Special}
        added = backend.get_added_tokens_decoder()
        promote = []
        for content in self._names.values():
            for token in added.values():
                if token.content == content and not token.special:
                    promote.append(content)
        if promote:
            # DeepSeek-R1 ships `<think>` as a non-special added token, which would be matched
            # inside text; marking it special makes `encode_special_tokens` cover it too.
            backend.add_special_tokens([tokenizers.AddedToken(c, special=True) for c in promote])
        # The setting that makes encode() treat special-token strings in text as plain text.
        backend.encode_special_tokens = True
        self._ids = {s: backend.token_to_id(c) for s, c in self._names.items()}
        self.require(Special.EOS)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, names: Mapping[Special, str] | None = None
    ) -> Tokenizer:
        """Load a `tokenizer.json`; `names` overrides the content of some special tokens."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        return cls(backend, source=path, names=names)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json to `path` (written to a temporary file, then renamed)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        self._backend.save(tmp)
        os.replace(tmp, path)

    def special_id(self, special: Special) -> int | None:
        """Id of `special`, or None when this tokenizer does not have it."""
        return self._ids[special]

    def content(self, special: Special) -> str:
        """The text of `special` here (DeepSeek's spelling unless `names` mapped it)."""
        return self._names[special]

    def require(self, *specials: Special) -> None:
        """Raise ValueError naming every one of `specials` this tokenizer lacks."""
        missing = [s for s in specials if self._ids[s] is None]
        if missing:
            listed = ", ".join(f"{s.name} {self._names[s]!r}" for s in missing)
            raise ValueError(
                f"tokenizer {self._source} lacks required special token(s): {listed}; "
                "pass names={Special.X: 'content'} to Tokenizer.load to map them"
            )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocab must be at least this)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped HF tokenizer."""
        return self._backend

    @property
    def eos_id(self) -> int:
        """End of sentence; always present (checked at construction)."""
        return self._ids[Special.EOS]

    @property
    def bos_id(self) -> int | None:
        """Begin of sentence id, or None if absent."""
        return self._ids[Special.BOS]

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None if absent."""
        return self._ids[Special.PAD]

    @property
    def fim_begin_id(self) -> int | None:
        """FIM prefix marker id, or None if absent."""
        return self._ids[Special.FIM_BEGIN]

    @property
    def fim_hole_id(self) -> int | None:
        """FIM hole marker id, or None if absent."""
        return self._ids[Special.FIM_HOLE]

    @property
    def fim_end_id(self) -> int | None:
        """FIM end (middle follows) id, or None if absent."""
        return self._ids[Special.FIM_END]

    @property
    def user_id(self) -> int | None:
        """User role id, or None if absent."""
        return self._ids[Special.USER]

    @property
    def assistant_id(self) -> int | None:
        """Assistant role id, or None if absent."""
        return self._ids[Special.ASSISTANT]

    @property
    def system_id(self) -> int | None:
        """System role id, or None if absent."""
        return self._ids[Special.SYSTEM]

    @property
    def think_begin_id(self) -> int | None:
        """`<think>` id, or None if absent."""
        return self._ids[Special.THINK_BEGIN]

    @property
    def think_end_id(self) -> int | None:
        """`</think>` id, or None if absent."""
        return self._ids[Special.THINK_END]

    @property
    def answer_begin_id(self) -> int | None:
        """`<answer>` id, or None if absent."""
        return self._ids[Special.ANSWER_BEGIN]

    @property
    def answer_end_id(self) -> int | None:
        """`</answer>` id, or None if absent."""
        return self._ids[Special.ANSWER_END]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens added, none recognized inside the text."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over several texts (parallel in Rust)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept as their content unless skipped."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __reduce__(self):
        # Rebuild through __init__ so encode_special_tokens (not serialized) is set again in
        # grain's worker processes.
        return (_from_json, (self._backend.to_str(), self._source, self._names))

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size})"


def _from_json(text: str, source: str, names: Mapping[Special, str]) -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer.from_str(text), source=source, names=names)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    split_digits: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; special tokens take ids 0.. in `Special` order.

    `split_digits` keeps every digit its own token (no merges across digits), which small
    models need to learn column arithmetic."""
    num_fixed = len(Special) + len(pre_tokenizers.ByteLevel.alphabet())
    if not isinstance(vocab_size, int) or vocab_size < num_fixed:
        raise ValueError(
            f"vocab_size must be an int >= {num_fixed} (specials + 256 bytes), got {vocab_size!r}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    backend = tokenizers.Tokenizer(models.BPE())
    # GPT-2 style: no prefix space, so decode(encode(text)) == text for every string.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[tokenizers.AddedToken(s.value, special=True) for s in Special],
        # Every byte is in the vocabulary, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend)
