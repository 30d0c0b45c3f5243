"""Byte-level BPE with DeepSeek's special tokens: ids, exact round trips, loading other files."""

from __future__ import annotations

import json
import pickle

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from train.tokenizer import FIM_SPECIALS, Special, Tokenizer, train_bpe

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Question: 47 * 38 = ?\nAnswer: 1786",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\nx = np.zeros((3, 4))\n",
] * 20
TRICKY = [
    "",
    " leading space and trailing  ",
    "unicode: ü, 日本語, emoji 🦜, combining é, tab\tnul\x00 ctrl\x7f",
    "never seen bytes: \u2603\u20ac\U0001f600",
    "\n\n\r\n  indented\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(CORPUS, 400)


def test_special_tokens_take_the_first_ids_in_documented_order(tok):
    for i, special in enumerate(Special):
        assert tok.special_id(special) == i
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # as in DeepSeek-V3
    assert tok.fim_begin_id == tok.special_id(Special.FIM_BEGIN)
    # A tiny corpus runs out of pairs to merge before 400; the specials and bytes are all there.
    assert len(Special) + 256 < tok.vocab_size <= 400


@pytest.mark.parametrize("text", TRICKY + CORPUS[:4])
def test_round_trip_is_exact_and_never_unknown(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_strings_in_text_are_plain_text(tok):
    for special in Special:
        text = f"a{special.value}b"
        ids = tok.encode(text)
        assert not set(ids) & set(range(len(Special))), special
        assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_decode_keeps_or_skips_specials(tok):
    ids = [tok.bos_id, *tok.encode("hi"), tok.eos_id]
    assert tok.decode(ids) == f"{Special.BOS.value}hi{Special.EOS.value}"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_save_load_and_pickle_keep_ids_and_behaviour(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    for other in (Tokenizer.load(path), Tokenizer.load(tmp_path), pickle.loads(pickle.dumps(tok))):
        assert other.vocab_size == tok.vocab_size
        assert [other.special_id(s) for s in Special] == [tok.special_id(s) for s in Special]
        text = f"x{Special.EOS.value}y" + TRICKY[2]
        assert other.encode(text) == tok.encode(text)
        assert other.eos_id not in other.encode(text)


def _deepseek_like(path, *, with_eos: bool = True) -> None:
    """A tokenizer.json laid out like DeepSeek-R1's: specials added after the vocabulary,
    `<think>` as a NON-special added token, no `<answer>` and no system token."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    specials = [Special.BOS, Special.PAD, *FIM_SPECIALS, Special.USER, Special.ASSISTANT]
    if with_eos:
        specials.insert(1, Special.EOS)
    backend.add_special_tokens([tokenizers.AddedToken(s.value, special=True) for s in specials])
    backend.add_tokens([tokenizers.AddedToken(Special.THINK_BEGIN.value, special=False)])
    backend.save(str(path))


def test_load_finds_specials_by_content_in_a_deepseek_like_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    _deepseek_like(path)
    raw = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    tok = Tokenizer.load(path)
    assert tok.bos_id == raw[Special.BOS.value] and tok.bos_id >= 256
    assert tok.eos_id == raw[Special.EOS.value]
    assert tok.fim_hole_id == raw[Special.FIM_HOLE.value]
    assert tok.think_begin_id == raw[Special.THINK_BEGIN.value]
    assert tok.answer_begin_id is None and tok.system_id is None  # optional: None
    # The non-special `<think>` must not be matched inside text either.
    assert tok.think_begin_id not in tok.encode("a <think> b")
    assert tok.decode(tok.encode("a <think> b")) == "a <think> b"


def test_missing_required_special_is_named(tmp_path):
    path = tmp_path / "tokenizer.json"
    _deepseek_like(path, with_eos=False)
    with pytest.raises(ValueError, match=r"EOS.*end▁of▁sentence"):
        Tokenizer.load(path)
    # Mapping EOS to another token of the file makes it loadable.
    tok = Tokenizer.load(path, names={Special.EOS: Special.PAD.value})
    assert tok.eos_id == tok.pad_id


def test_require_names_missing_fim_tokens(tmp_path):
    backend = tokenizers.Tokenizer(models.BPE())
    backend.add_special_tokens([Special.EOS.value])
    tok = Tokenizer(backend)
    assert tok.fim_begin_id is None
    with pytest.raises(ValueError, match=r"FIM_BEGIN.*FIM_HOLE.*FIM_END"):
        tok.require(*FIM_SPECIALS)


def test_bad_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=r"nope"):
        Tokenizer.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json.*not valid JSON"):
        Tokenizer.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match=r"wrong.json.*not a valid tokenizer.json"):
        Tokenizer.load(wrong)


@pytest.mark.parametrize("vocab_size", [0, 100, 268, 300.0])
def test_train_bpe_rejects_too_small_vocab(vocab_size):
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 269"):
        train_bpe(CORPUS, vocab_size)
