"""Document sources: user files (text, JSONL, Parquet), the stdlib's Python code, arithmetic.

Each source is a small frozen config; `load_documents(source, split)` returns its documents
(one `str` each) for a split. Splits are decided per document by a stable hash (of the text for
user files, of the relative path for the stdlib, of the question for arithmetic), so a document
can never be both trained on and held out.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from train import arithmetic
from train.splits import DEFAULT_HELDOUT_FRACTION, Split, check_fraction, split_of

# Folders of the stdlib that are tests, demos, vendored tools or installers rather than
# library code a model should learn Python from.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3"}
    | {"turtledemo", "ensurepip", "pydoc_data", "__phello__"}
)
JSONL_EXTENSIONS = (".jsonl",)
PARQUET_EXTENSIONS = (".parquet",)


class SourceKind(enum.Enum):
    """Where documents come from."""

    FILES = "files"  # the user's text / JSONL / Parquet files and folders
    STDLIB = "stdlib"  # the running interpreter's standard-library .py files
    ARITHMETIC = "arithmetic"  # train/arithmetic.py problems with worked solutions


def _check_weight(obj, max_bytes_name: str | None = None) -> None:
    name = type(obj).__name__
    if not isinstance(obj.weight, int | float) or obj.weight < 0:
        raise ValueError(f"{name}.weight must be >= 0 (0 turns the source off), got {obj.weight!r}")
    check_fraction(name, "heldout_fraction", obj.heldout_fraction)
    if max_bytes_name is not None:
        value = getattr(obj, max_bytes_name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}.{max_bytes_name} must be an int > 0 or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FilesSource:
    """User files or folders (walked recursively, sorted); `weight` 0 turns the source off."""

    kind: ClassVar[SourceKind] = SourceKind.FILES
    path: str | None = None
    weight: float = 0.0
    text_extensions: tuple[str, ...] = (".txt", ".md")  # one document per file
    jsonl_field: str = "text"  # .jsonl: one document per line, this field
    parquet_column: str = "text"  # .parquet: one document per row, this column
    max_bytes: int | None = None  # stop after this many UTF-8 bytes per split
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    def __post_init__(self):
        _check_weight(self, "max_bytes")
        if self.weight > 0 and not self.path:
            raise ValueError("FilesSource.path must name a file or folder when weight > 0")
        for ext in self.text_extensions:
            if not ext.startswith("."):
                raise ValueError(f"FilesSource.text_extensions entries start with '.', got {ext!r}")


@dataclasses.dataclass(frozen=True)
class StdlibSource:
    """The running interpreter's standard-library Python source, one file per document."""

    kind: ClassVar[SourceKind] = SourceKind.STDLIB
    weight: float = 0.8
    max_bytes: int | None = 16 << 20  # the whole 3.11 stdlib is ~10 MB
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    def __post_init__(self):
        _check_weight(self, "max_bytes")


@dataclasses.dataclass(frozen=True)
class ArithmeticSource:
    """Generated arithmetic problems rendered as documents (see train/arithmetic.py)."""

    kind: ClassVar[SourceKind] = SourceKind.ARITHMETIC
    weight: float = 0.2
    train_count: int = 20_000
    heldout_count: int = 500
    max_digits: int = arithmetic.MAX_DIGITS
    seed: int = 0  # fixes the corpus itself; the data seed fixes its order
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    def __post_init__(self):
        _check_weight(self)
        for name in ("train_count", "heldout_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ArithmeticSource.{name} must be a positive int, got {value!r}")
        if not isinstance(self.max_digits, int) or not 1 <= self.max_digits <= 9:
            value = self.max_digits
            raise ValueError(f"ArithmeticSource.max_digits must be in [1, 9], got {value!r}")


Source = FilesSource | StdlibSource | ArithmeticSource


def _walk(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"document path not found: {path}")
    if path.is_file():
        return [path]
    return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e})") from None


def _iter_jsonl(file: Path, field: str) -> Iterator[str]:
    with open(file, encoding="utf-8") as f:
        try:
            yield from _parse_jsonl(file, enumerate(f, 1), field)
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e})") from None


def _parse_jsonl(file: Path, lines: Iterator[tuple[int, str]], field: str) -> Iterator[str]:
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{file}:{lineno}: no field {field!r} (has {keys})")
        if not isinstance(record[field], str):
            kind = type(record[field]).__name__
            raise ValueError(f"{file}:{lineno}: field {field!r} is {kind}, not a string")
        yield record[field]


def _iter_parquet(file: Path, column: str) -> Iterator[str]:
    # pyarrow's own errors name a buffer, not the file: every one is re-raised with the path.
    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{file}: not a readable parquet file ({err})") from None
    if column not in schema.names:
        raise ValueError(f"{file}: no column {column!r} (columns: {schema.names})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{file}: column {column!r} holds {kind}, not strings")
    # One row group at a time, so a large file never has to fit in memory at once.
    for group in range(parquet.num_row_groups):
        try:
            texts = parquet.read_row_group(group, columns=[column]).column(0).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{file}: row group {group} is unreadable ({err})") from None
        yield from (text for text in texts if text is not None)  # null rows carry no document


def iter_file_documents(source: FilesSource) -> Iterator[str]:
    """Every document under `source.path`, in sorted file order (both splits)."""
    root = Path(source.path)
    explicit = root.is_file()
    for file in _walk(root):
        suffix = file.suffix.lower()
        if suffix in JSONL_EXTENSIONS:
            yield from _iter_jsonl(file, source.jsonl_field)
        elif suffix in PARQUET_EXTENSIONS:
            yield from _iter_parquet(file, source.parquet_column)
        elif suffix in source.text_extensions:
            yield _read_text(file)
        elif explicit:
            known = (*source.text_extensions, *JSONL_EXTENSIONS, *PARQUET_EXTENSIONS)
            raise ValueError(f"{file}: unsupported extension {suffix!r}; supported: {known}")


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, file) of the stdlib's library .py files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for file in root.rglob("*.py"):
        rel = file.relative_to(root)
        if any(p in STDLIB_EXCLUDED_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        files.append((rel.as_posix(), file))
    return sorted(files)


def _iter_stdlib(source: StdlibSource, split: Split) -> Iterator[str]:
    for rel, file in stdlib_files():
        if split_of(rel, source.heldout_fraction) is not split:
            continue
        try:
            yield file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8; they are not needed


def _capped(texts: Iterator[str], max_bytes: int | None) -> list[str]:
    docs, total = [], 0
    for text in texts:
        if max_bytes is not None and total >= max_bytes:
            break
        docs.append(text)
        total += len(text.encode("utf-8"))
    return docs


def load_documents(source: Source, split: Split) -> list[str]:
    """The documents of `source` in `split`, in a fixed order."""
    if isinstance(source, FilesSource):
        texts = (
            t for t in iter_file_documents(source) if split_of(t, source.heldout_fraction) is split
        )
        return _capped(texts, source.max_bytes)
    if isinstance(source, StdlibSource):
        return _capped(_iter_stdlib(source, split), source.max_bytes)
    if isinstance(source, ArithmeticSource):
        count = source.train_count if split is Split.TRAIN else source.heldout_count
        problems = arithmetic.generate(
            split,
            count,
            source.seed,
            max_digits=source.max_digits,
            heldout_fraction=source.heldout_fraction,
        )
        return [arithmetic.to_document(p) for p in problems]
    raise TypeError(f"unknown source {source!r}; expected one of {Source}")
