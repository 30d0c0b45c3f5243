"""Document-level FIM in PSM form: layout, exact reassembly, rate, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers
from tokenizers import models

from train import fim
from train.tokenizer import Special, Tokenizer, train_bpe

TEXTS = [
    "def f(x):\n    return x * 2\n",
    "Question: 12 + 30 = ?\nAnswer: 42",
    "ünïcödé 日本語 🦜 mixed with ascii",
    "",
    "a",
] * 10


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, 350)


def _pieces(tok: Tokenizer, ids: list[int]) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of a PSM document, checking the sentinel layout on the way."""
    begin, hole, end = tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id
    assert ids[0] == begin and ids[-1] == tok.eos_id
    for special in (begin, hole, end, tok.eos_id):
        assert ids.count(special) == 1
    i, j = ids.index(hole), ids.index(end)
    assert 0 < i < j < len(ids) - 1
    return tok.decode(ids[1:i]), tok.decode(ids[j + 1 : -1]), tok.decode(ids[i + 1 : j])


def test_rate_one_is_psm_and_reassembles_exactly(tok):
    rng = np.random.default_rng(0)
    for text in TEXTS:
        ids = fim.document_tokens(text, tok, rng, fim_rate=1.0)
        assert ids.dtype == np.int32
        prefix, middle, suffix = _pieces(tok, ids.tolist())
        assert prefix + middle + suffix == text


def test_cuts_are_at_characters_and_cover_all_positions(tok):
    rng = np.random.default_rng(1)
    text = "abcdé"  # 5 characters, 6 bytes: a byte cut would break the é
    seen = set()
    for _ in range(400):
        i, j = fim.split_points(len(text), rng)
        assert 0 <= i <= j <= len(text)
        seen.add((i, j))
        prefix, middle, suffix = _pieces(tok, fim.fim_tokens(text, tok, rng))
        assert prefix + middle + suffix == text
    assert len(seen) == 21  # every sorted pair of positions in [0, 5]


def test_rate_zero_is_text_plus_eos(tok):
    rng = np.random.default_rng(0)
    for text in TEXTS:
        ids = fim.document_tokens(text, tok, rng, fim_rate=0.0).tolist()
        assert ids == [*tok.encode(text), tok.eos_id]


def test_rate_matches_binomial(tok):
    rng = np.random.default_rng(2)
    n, rate = 4000, 0.1
    hits = sum(
        int(fim.document_tokens("some text", tok, rng, fim_rate=rate)[0] == tok.fim_begin_id)
        for _ in range(n)
    )
    sd = np.sqrt(n * rate * (1 - rate))
    assert abs(hits - n * rate) < 4 * sd  # fails by chance with probability ~6e-5


def test_same_rng_state_same_tokens(tok):
    a = [fim.document_tokens(t, tok, np.random.default_rng(5), fim_rate=0.5) for t in TEXTS]
    b = [fim.document_tokens(t, tok, np.random.default_rng(5), fim_rate=0.5) for t in TEXTS]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_missing_sentinels_are_named():
    backend = tokenizers.Tokenizer(models.BPE())
    backend.add_special_tokens([Special.EOS.value])
    tok = Tokenizer(backend)
    rng = np.random.default_rng(0)
    assert fim.document_tokens("", tok, rng, fim_rate=0.0).tolist() == [tok.eos_id]
    with pytest.raises(ValueError, match=r"FIM_BEGIN"):
        fim.document_tokens("abc", tok, rng, fim_rate=1.0)


@pytest.mark.parametrize("rate", [-0.1, 1.5, "0.1"])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match=r"X.fim_rate must be in \[0, 1\]"):
        fim.check_rate("X", rate)
