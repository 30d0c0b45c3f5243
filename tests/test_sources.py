"""Document sources and the arithmetic corpus: formats, errors, splits, verified solutions."""

from __future__ import annotations

import ast
import dataclasses
import json
import operator
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train import arithmetic
from train.arithmetic import Operation
from train.sources import (
    ArithmeticSource,
    FilesSource,
    StdlibSource,
    iter_file_documents,
    load_documents,
    stdlib_files,
)
from train.splits import Split

# ---------------------------------------------------------------- arithmetic: a step checker

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expr: str) -> int:
    """Value of an expression of non-negative ints, +, -, * (nothing else is accepted)."""

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise AssertionError(f"unexpected syntax in {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


_COLUMN = re.compile(r"^(.*) = (\d+), write (\d), (carry|borrow) (\d)$")


def check_solution(problem: arithmetic.ArithmeticProblem) -> None:
    """Assert the answer is right and every step of the solution is true and well-formed."""
    a_text, op, b_text = problem.question.split(" ")
    assert problem.answer == _evaluate(problem.question)
    lines = problem.solution.split("\n")
    # The last line is the whole computation as an equation chain ending in the answer.
    chain = lines[-1].split(" = ")
    assert chain[0] == problem.question and chain[-1] == str(problem.answer), lines[-1]
    values = [_evaluate(side) for side in chain]
    assert values == [problem.answer] * len(values), lines[-1]
    if op == "*":
        assert len(lines) == 1
        return
    # Column method: digits of a and b, least significant first, one line per column.
    da = [int(c) for c in reversed(a_text)]
    db = [int(c) for c in reversed(b_text)]
    written, carry = [], 0
    for i, line in enumerate(lines[:-1]):
        if line.startswith("write the final carry"):
            assert op == "+" and i == len(lines) - 2 and carry == int(line.split()[-1]) == 1
            written.append(carry)
            continue
        lhs, value, digit, word, out = _COLUMN.match(line).groups()
        value, digit, out = int(value), int(digit), int(out)
        assert _evaluate(lhs) == value, line
        terms = [int(t) for t in re.split(r" [+-] ", lhs)]
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        assert terms == [x, y] + ([carry] if carry else []) or (
            op == "-" and terms == [x + 10 * out, y] + ([carry] if carry else [])
        ), line
        if op == "+":
            assert word == "carry" and (digit, out) == (value % 10, value // 10), line
        else:
            assert word == "borrow" and digit == value and 0 <= digit <= 9, line
            assert out == (1 if x - y - carry < 0 else 0), line
        written.append(digit)
        carry = out
    assert int("".join(map(str, reversed(written)))) == problem.answer


def test_checker_rejects_a_wrong_step():
    good = arithmetic.make_problem(478, Operation.ADD, 356)
    check_solution(good)
    bad = arithmetic.ArithmeticProblem(
        good.question, good.answer, good.solution.replace("7 + 5 + 1 = 13", "7 + 5 + 1 = 14")
    )
    with pytest.raises(AssertionError):
        check_solution(bad)


def test_every_small_problem_and_a_random_sample_of_large_ones_is_verified():
    small = range(0, 130, 3)
    pairs = [(a, b) for a in small for b in small]
    rng = np.random.default_rng(0)
    pairs += [tuple(int(x) for x in rng.integers(0, 10_000, size=2)) for _ in range(500)]
    pairs += [(9999, 9999), (1000, 1), (1000, 999), (9999, 1), (10, 0), (0, 0)]
    for a, b in pairs:
        for op in Operation:
            x, y = (max(a, b), min(a, b)) if op is Operation.SUB else (a, b)
            check_solution(arithmetic.make_problem(x, op, y))


def test_document_format():
    problem = arithmetic.make_problem(47, Operation.MUL, 38)
    assert arithmetic.to_document(problem) == (
        "Question: 47 * 38 = ?\n"
        "Solution:\n47 * 38 = 47 * 30 + 47 * 8 = 1410 + 376 = 1786\n"
        "Answer: 1786"
    )


def test_generate_is_deterministic_verified_and_covers_the_family():
    problems = arithmetic.generate(Split.TRAIN, 600, seed=3)
    assert problems == arithmetic.generate(Split.TRAIN, 600, seed=3)
    assert problems != arithmetic.generate(Split.TRAIN, 600, seed=4)
    for p in problems:
        check_solution(p)
    ops = {p.question.split(" ")[1] for p in problems}
    lengths = {len(t) for p in problems for t in p.question.split(" ")[::2]}
    assert ops == {"+", "-", "*"} and lengths == {1, 2, 3, 4}


@pytest.mark.parametrize("seed", [0, 1])
def test_train_and_heldout_questions_are_disjoint(seed):
    train = arithmetic.generate(Split.TRAIN, 3000, seed=seed, max_digits=2)
    held = arithmetic.generate(Split.HELDOUT, 100, seed=seed, max_digits=2)
    for p in held:
        check_solution(p)
    train_q, held_q = {p.question for p in train}, {p.question for p in held}
    assert len(held_q) > 10 and not train_q & held_q


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"max_digits"):
        arithmetic.generate(Split.TRAIN, 1, 0, max_digits=0)
    with pytest.raises(ValueError, match=r"heldout_fraction"):
        arithmetic.generate(Split.TRAIN, 1, 0, heldout_fraction=1.0)
    with pytest.raises(ValueError, match=r"subtraction needs a >= b"):
        arithmetic.make_problem(3, Operation.SUB, 5)
    # 1-digit problems: 300 questions, none falls in a 0.01% held-out slice.
    with pytest.raises(ValueError, match=r"found only 0 of 1 heldout"):
        arithmetic.generate(Split.HELDOUT, 1, 0, max_digits=1, heldout_fraction=1e-4)


# ---------------------------------------------------------------- user files


def _write_corpus(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("text b")
    (root / "a.md").write_text("markdown a")
    (root / "sub" / "c.rst").write_text("restructured c")
    (root / "sub" / "skip.png").write_bytes(b"\x89PNG")
    lines = [json.dumps({"text": f"json {i}", "id": i}) for i in range(3)]
    (root / "sub" / "d.jsonl").write_text("\n".join(lines) + "\n\n")
    table = pa.table({"content": [f"parquet {i}" for i in range(7)] + [None]})
    pq.write_table(table, root / "sub" / "deeper" / "e.parquet", row_group_size=3)


def test_folder_is_walked_recursively_in_sorted_order(tmp_path):
    _write_corpus(tmp_path)
    source = FilesSource(path=str(tmp_path), weight=1.0, parquet_column="content")
    docs = list(iter_file_documents(source))
    expected = ["markdown a", "text b", "json 0", "json 1", "json 2"]
    expected += [f"parquet {i}" for i in range(7)]  # row groups of 3, 3, 2; null skipped
    assert docs == expected
    with_rst = FilesSource(
        path=str(tmp_path), weight=1.0, parquet_column="content", text_extensions=(".rst",)
    )
    assert "restructured c" in list(iter_file_documents(with_rst))


def test_file_splits_are_disjoint_and_complete(tmp_path):
    lines = [json.dumps({"body": f"document number {i}"}) for i in range(400)]
    (tmp_path / "x.jsonl").write_text("\n".join(lines))
    source = FilesSource(path=str(tmp_path), weight=1.0, jsonl_field="body", heldout_fraction=0.1)
    train = load_documents(source, Split.TRAIN)
    held = load_documents(source, Split.HELDOUT)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(f"document number {i}" for i in range(400))
    assert 15 < len(held) < 70  # about 10% of 400
    capped = load_documents(dataclasses.replace(source, max_bytes=100), Split.TRAIN)
    assert capped == train[: len(capped)] and 5 <= len(capped) <= 7  # ~18 bytes each


def test_bad_files_give_errors_naming_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing_dir"):
        list(iter_file_documents(FilesSource(path=str(tmp_path / "missing_dir"), weight=1.0)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_file_documents(FilesSource(path=str(bad), weight=1.0)))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield.jsonl:3: no field 'text'.*body"):
        list(iter_file_documents(FilesSource(path=str(nofield), weight=1.0)))
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    with pytest.raises(ValueError, match=r"t.parquet: no column 'text'.*body"):
        list(iter_file_documents(FilesSource(path=str(parquet), weight=1.0)))
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"g\.parquet: not a readable parquet file"):
        list(iter_file_documents(FilesSource(path=str(garbage), weight=1.0)))
    damaged = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"doc {i} " * 50 for i in range(100)]}), damaged)
    data = bytearray(damaged.read_bytes())
    data[4:200] = b"\xff" * 196  # the first data page; the footer stays intact
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"d\.parquet: row group 0 is unreadable"):
        list(iter_file_documents(FilesSource(path=str(damaged), weight=1.0)))
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(ValueError, match=r"n.parquet: column 'text' holds int64, not strings"):
        list(iter_file_documents(FilesSource(path=str(numbers), weight=1.0)))
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"typed.jsonl:1: field 'text' is int, not a string"):
        list(iter_file_documents(FilesSource(path=str(typed), weight=1.0)))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl: not UTF-8"):
        list(iter_file_documents(FilesSource(path=str(latin), weight=1.0)))
    odd = tmp_path / "data.csv"
    odd.write_text("a,b")
    with pytest.raises(ValueError, match=r"data.csv: unsupported extension '.csv'"):
        list(iter_file_documents(FilesSource(path=str(odd), weight=1.0)))


def test_source_configs_validate():
    with pytest.raises(ValueError, match=r"FilesSource.path must name"):
        FilesSource(weight=1.0)
    with pytest.raises(ValueError, match=r"StdlibSource.weight must be >= 0"):
        StdlibSource(weight=-1.0)
    with pytest.raises(ValueError, match=r"StdlibSource.max_bytes must be an int > 0"):
        StdlibSource(max_bytes=0)
    with pytest.raises(ValueError, match=r"StdlibSource.heldout_fraction must be in \(0, 1\)"):
        StdlibSource(heldout_fraction=0.0)
    with pytest.raises(ValueError, match=r"ArithmeticSource.train_count"):
        ArithmeticSource(train_count=0)
    with pytest.raises(ValueError, match=r"text_extensions"):
        FilesSource(text_extensions=("txt",))


# ---------------------------------------------------------------- the stdlib corpus


def test_stdlib_files_are_library_code_sorted():
    files = stdlib_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 300
    assert "json/decoder.py" in rels and "os.py" in rels
    for rel in rels:
        parts = rel.split("/")[:-1]
        assert not {"test", "tests", "site-packages", "idlelib", "lib2to3"} & set(parts), rel


def test_stdlib_splits_are_disjoint_deterministic_and_capped():
    source = StdlibSource(max_bytes=None, heldout_fraction=0.05)
    train = load_documents(source, Split.TRAIN)
    held = load_documents(source, Split.HELDOUT)
    assert load_documents(source, Split.HELDOUT) == held
    assert not set(train) & set(held)
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.1
    capped = load_documents(dataclasses.replace(source, max_bytes=50_000), Split.TRAIN)
    size = sum(len(d.encode()) for d in capped)
    assert capped == train[: len(capped)] and 50_000 <= size < 50_000 + max(map(len, capped)) * 4
