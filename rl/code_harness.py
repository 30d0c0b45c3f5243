"""One assert case's result, from the sandboxed program to the parent (issue 13).

Both halves of the wire format live here so that they cannot drift apart:
  - in the sandbox, `run_case` runs on the program's own thread: it executes the program as
    __main__, evaluates the case's expression (say `add(2, 3)`) in its namespace and `encode`s
    the result to plain data; rl/sandbox_child.py loads this file by path (it imports only the
    standard library) and reports the bytes to the parent under the run's secret;
  - in the parent, `decode` turns the reported text back into plain data and `equal` compares
    it with the expected value, which never enters the sandbox.

Plain data is None, bool, int, float, complex, str, bytes and list, tuple, dict, set and
frozenset of plain data, each of exactly that type (subclasses are not plain: an int whose
__eq__ says True to everything fails), nested at most MAX_DEPTH deep. JSON carries it:
null/true/false, integers, finite floats (always written with a '.' or an exponent), strings
and lists as themselves; the rest as one-key objects {"tuple": [..]}, {"set": [..]},
{"frozenset": [..]}, {"dict": [[key, value], ..]}, {"bytes": "<hex>"}, {"float": "nan" |
"inf" | "-inf"}, {"complex": [real, imag]}.

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
import json
import math
import sys
import traceback
from _json import encode_basestring_ascii

MAX_DEPTH = 64
REL_TOL = ABS_TOL = 1e-9

# Bound at import, before any program runs in the sandbox: a program that rebinds a builtin
# (type, repr, eval, ...) or patches json does not change what run_case reports.
_type, _len, _eval, _isfinite = type, len, eval, math.isfinite
_int_repr, _float_repr, _bytes_hex = int.__repr__, float.__repr__, bytes.hex
_NON_FINITE = ("nan", "inf", "-inf")


class NotPlain(ValueError):
    """The value is not plain data (see the module docstring)."""


def run_case(program, case, namespace: dict, box: list, gate, done) -> None:
    """In the sandbox, on the program's thread: run `program` (a code object) in `namespace`,
    evaluate `case` there and append its encoding to `box`; release `done` in any event."""
    gate.acquire()  # the harness thread has finished its setup
    try:
        exec(program, namespace)
        box.append(encode(_eval(case, namespace)))
    except SystemExit:  # the program ended before the case ran: no result
        pass
    except NotPlain as error:
        sys.stderr.write(f"the case's result is not plain data: {error}\n")
    except BaseException as error:  # no result; the traceback from the program's frame on
        traceback.print_exception(error.with_traceback(error.__traceback__.tb_next))
    finally:
        try:  # noqa: SIM105 (no library code on this path once the program has run)
            done.release()
        except RuntimeError:  # the program released it already
            pass


def encode(value) -> bytes:
    """The JSON bytes of plain data; NotPlain for anything else."""
    out: list[str] = []
    _encode(value, out, 0)
    return "".join(out).encode("ascii")


def _float(value: float) -> str:
    if _isfinite(value):
        return _float_repr(value)
    name = "nan" if value != value else "inf" if value > 0 else "-inf"
    return f'{{"float":"{name}"}}'


def _encode(value, out: list, depth: int) -> None:
    kind = _type(value)
    if value is None:
        out.append("null")
    elif kind is bool:
        out.append("true" if value else "false")
    elif kind is int:
        out.append(_int_repr(value))
    elif kind is float:
        out.append(_float(value))
    elif kind is str:
        out.append(encode_basestring_ascii(value))
    elif kind is bytes:
        out.append(f'{{"bytes":"{_bytes_hex(value)}"}}')
    elif kind is complex:
        out.append(f'{{"complex":[{_float(value.real)},{_float(value.imag)}]}}')
    elif kind is list:
        _encode_items(value, "[", "]", out, depth)
    elif kind is tuple or kind is set or kind is frozenset:  # identity: a metaclass has no say
        tag = "tuple" if kind is tuple else "set" if kind is set else "frozenset"
        _encode_items(value, f'{{"{tag}":[', "]}", out, depth)
    elif kind is dict:
        _encode_items(value.items(), '{"dict":[', "]}", out, depth, pairs=True)
    else:
        raise NotPlain(f"{kind.__qualname__} is not one of the plain types")


def _encode_items(items, opening: str, closing: str, out: list, depth: int, pairs=False):
    if depth >= MAX_DEPTH:
        raise NotPlain(f"nested deeper than {MAX_DEPTH}")
    out.append(opening)
    first = True
    for item in items:
        if not first:
            out.append(",")
        first = False
        if pairs:  # a (key, value) of dict.items()
            out.append("[")
            _encode(item[0], out, depth + 1)
            out.append(",")
            _encode(item[1], out, depth + 1)
            out.append("]")
        else:
            _encode(item, out, depth + 1)
    out.append(closing)


def decode(text: str):
    """Plain data from `encode`'s format; ValueError for anything else."""
    try:
        return _decode(json.loads(text, parse_constant=_no_constant), 0)
    except (ValueError, TypeError, RecursionError, OverflowError) as error:
        raise ValueError(f"malformed result {text[:80]!r}: {error}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not part of the format (non-finite floats are tagged)")


def _number(value):
    if _type(value) in (int, float):
        return value
    if _type(value) is dict and list(value) == ["float"] and value["float"] in _NON_FINITE:
        return float(value["float"])
    raise ValueError(f"expected a number, got {value!r}")


def _decode(data, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    kind = _type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [_decode(item, depth + 1) for item in data]
    if kind is not dict or _len(data) != 1:
        raise ValueError(f"expected a value or a one-key tagged object, got {data!r}")
    ((tag, body),) = data.items()
    if tag == "float":
        return _number(data)
    if tag == "bytes" and _type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and _type(body) is list and _len(body) == 2:
        return complex(_number(body[0]), _number(body[1]))
    if _type(body) is not list:
        raise ValueError(f"{tag!r} must hold a list, got {body!r}")
    items = [_decode(item, depth + 1) for item in body]
    if tag == "tuple":
        return tuple(items)
    if tag in ("set", "frozenset"):
        return (set if tag == "set" else frozenset)(items)
    if tag == "dict" and all(_type(p) is list and _len(p) == 2 for p in items):
        return {key: value for key, value in items}
    raise ValueError(f"unknown tag {tag!r} or malformed body {body!r}")


def equal(actual, expected, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> bool:
    """Whether decoded `actual` matches `expected` by the rules in the module docstring."""
    a, e = _type(actual), _type(expected)
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
        return _len(actual) == _len(expected) and all(
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
    kind = _type(value)
    if kind is bool:
        return ("bool", value)
    if kind is tuple:
        return ("tuple", tuple(_key(x) for x in value))
    if kind is frozenset:
        return ("frozenset", frozenset(_key(x) for x in value))
    return ("number" if kind in (int, float, complex) else kind.__name__, value)
