"""One assert case's result, from the sandboxed program to the parent (issue 13).

In the sandbox (rl/sandbox_child.py, `_run_case`) the program runs as __main__ on a thread of
its own, the case's expression (say `add(2, 3)`) is evaluated in its namespace and the value
serialised with marshal, version 2 (no back-references: every object written out in full);
the harness reports the bytes, in hex, to the parent under the run's secret. Here, in the
parent, `decode` parses that hex (with a strict parser of its own, never marshal.loads, which
is not safe on untrusted data) into plain data, and `equal` compares it with the expected
value, which never enters the sandbox. `encode` is what the sandbox does, for the parent to
check that an expected value is plain data.

Plain data is None, bool, int (below 2**15000), float, complex, str, bytes and list, tuple,
dict, set and frozenset of plain data, nested at most MAX_DEPTH deep. marshal takes each of
exactly that type and refuses subclasses (an int whose __eq__ says True to everything is not
plain data) and every other object; a bytes-like object (bytearray, memoryview, a bytes
subclass) is written as its bytes. marshal is C code bound before the program runs: no method
of the program's runs while it serialises, so the report is the value the expression
returned, whatever the program rebinds (builtins, json, repr, marshal.dumps).

`equal(actual, expected)`: bool equals only bool and None only None; numbers (int, float,
complex) equal when both are ints and identical, else when math.isclose / cmath.isclose with
rel_tol 1e-9 and abs_tol 1e-9 (both tunable) says so, so 5 == 5.0 and NaN equals nothing;
str, bytes exactly; a list equals a list and a tuple a tuple of the same length, element by
element; dicts have the same keys and equal values; set and frozenset compare as Python
does. Dict keys and set elements match exactly (no tolerance; 1 and 1.0 are one key, True is
another).
"""

from __future__ import annotations

import cmath
import marshal
import math
import struct

MAX_DEPTH = 64
MAX_INT_DIGITS = 1000  # marshal's 15-bit digits: 2**15000, past Python's 4300-digit str limit
REL_TOL = ABS_TOL = 1e-9
_VERSION = 2  # as rl/sandbox_child.py writes it


class NotPlain(ValueError):
    """The value is not plain data (see the module docstring)."""


def encode(value) -> str:
    """The report the sandbox makes of `value` (hex); NotPlain if it is not plain data."""
    try:
        text = marshal.dumps(value, _VERSION).hex()
        decode(text)
    except ValueError as error:
        raise NotPlain(f"a {type(value).__name__} is not plain data: {error}") from None
    return text


def decode(text: str):
    """Plain data from a report (hex of marshal version 2 of plain data); ValueError for
    anything else."""
    try:
        data = bytes.fromhex(text)
        value, end = _read(data, 0, 0)
        if end != len(data):
            raise ValueError(f"{len(data) - end} bytes after the value")
    except (ValueError, TypeError, IndexError, struct.error, RecursionError) as error:
        raise ValueError(f"malformed report {text[:80]!r}: {error}") from None
    return value


_CONSTANTS = {ord("N"): None, ord("T"): True, ord("F"): False}
_SEQUENCES = {ord("("): tuple, ord("["): list, ord("<"): set, ord(">"): frozenset}


def _size(data: bytes, at: int) -> tuple[int, int]:
    (size,) = struct.unpack_from("<i", data, at)
    if size < 0:
        raise ValueError(f"negative size {size}")
    return size, at + 4


def _read(data: bytes, at: int, depth: int) -> tuple[object, int]:
    """The plain value marshalled at data[at:] and where it ends."""
    code, at = data[at], at + 1
    if code in _CONSTANTS:
        return _CONSTANTS[code], at
    if code == ord("i"):
        return struct.unpack_from("<i", data, at)[0], at + 4
    if code == ord("g"):
        return struct.unpack_from("<d", data, at)[0], at + 8
    if code == ord("y"):
        return complex(*struct.unpack_from("<dd", data, at)), at + 16
    if code == ord("l"):
        (count,) = struct.unpack_from("<i", data, at)
        if not 0 < abs(count) <= MAX_INT_DIGITS:
            raise ValueError(f"an int of {abs(count)} digits")
        digits = struct.unpack_from(f"<{abs(count)}H", data, at + 4)
        if max(digits) >= 1 << 15:
            raise ValueError("an int digit out of range")
        value = sum(digit << (15 * i) for i, digit in enumerate(digits))
        return (value if count > 0 else -value), at + 4 + 2 * abs(count)
    if code in (ord("s"), ord("u")):
        size, at = _size(data, at)
        if at + size > len(data):
            raise ValueError(f"a string of {size} bytes past the end")
        chunk = data[at : at + size]
        return (chunk if code == ord("s") else chunk.decode("utf-8", "surrogatepass")), at + size
    if depth >= MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    if code in _SEQUENCES:
        size, at = _size(data, at)
        items = []
        for _ in range(size):
            item, at = _read(data, at, depth + 1)
            items.append(item)
        return _SEQUENCES[code](items), at
    if code == ord("{"):
        result = {}
        while data[at] != ord("0"):
            key, at = _read(data, at, depth + 1)
            result[key], at = _read(data, at, depth + 1)
        return result, at + 1
    raise ValueError(f"type code {chr(code)!r} is not plain data")


def equal(actual, expected, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> bool:
    """Whether decoded `actual` matches `expected` by the rules in the module docstring."""
    a, e = type(actual), type(expected)
    if a is bool or e is bool or actual is None or expected is None:
        return a is e and actual == expected
    if a in (int, float, complex) and e in (int, float, complex):
        if a is int and e is int:
            return actual == expected
        close = cmath.isclose if complex in (a, e) else math.isclose
        try:
            return close(actual, expected, rel_tol=rel_tol, abs_tol=abs_tol)
        except OverflowError:  # an int too large for a float
            return False
    if a in (set, frozenset) and e in (set, frozenset):
        return {_key(x) for x in actual} == {_key(x) for x in expected}
    if a is not e:
        return False
    if a in (list, tuple):
        return len(actual) == len(expected) and all(
            equal(x, y, rel_tol, abs_tol) for x, y in zip(actual, expected, strict=True)
        )
    if a is dict:
        mine, theirs = ({_key(k): v for k, v in d.items()} for d in (actual, expected))
        return mine.keys() == theirs.keys() and all(
            equal(mine[k], theirs[k], rel_tol, abs_tol) for k in theirs
        )
    return actual == expected  # str, bytes


def _key(value):
    """A hashable stand-in that keeps bool apart from int (exact match, as for dict keys)."""
    kind = type(value)
    if kind is bool:
        return ("bool", value)
    if kind is tuple:
        return ("tuple", tuple(_key(x) for x in value))
    if kind is frozenset:
        return ("frozenset", frozenset(_key(x) for x in value))
    return ("number" if kind in (int, float, complex) else kind.__name__, value)
