"""`--set key=value` overrides applied to frozen experiment config dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Sequence
from typing import Any


def _convert(raw: str, hint: Any, key: str) -> Any:
    """Parse `raw` as the annotated type of the field `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() == "none" and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        # A homogeneous tuple from a comma-separated list: seeds=0,1,2.
        return tuple(_convert(part.strip(), args[0], key) for part in raw.split(",") if part)
    if origin is dict and len(args) == 2:
        # A mapping from name:value pairs: require=accuracy:1,reward_model:0.5.
        out = {}
        for part in (p.strip() for p in raw.split(",") if p.strip()):
            name, sep, value = part.partition(":")
            if not sep:
                raise ValueError(f"--set {key}={raw}: expected name:value pairs, got {part!r}")
            out[_convert(name.strip(), args[0], key)] = _convert(value.strip(), args[1], key)
        return out
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        valid = [m.value for m in hint]
        for member in hint:
            if raw in (member.value, member.name, member.name.lower()):
                return member
        raise ValueError(f"--set {key}={raw}: expected one of {valid}")
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: expected true or false")
    if hint in (int, float, str):
        try:
            return hint(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw}: expected {hint.__name__}") from None
    raise ValueError(f"--set {key}: fields of type {hint} cannot be set from the command line")


def apply(config: Any, assignments: Sequence[str]) -> Any:
    """Return `config` with each 'a.b.c=value' assignment applied (nested dataclasses)."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {assignment!r}")
        config = _set(config, key.strip().split("."), raw.strip(), key.strip())
    return config


def _set(obj: Any, path: list[str], raw: str, key: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"--set {key}: {type(obj).__name__} has no fields")
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"--set {key}: unknown field {path[0]!r}; fields: {sorted(names)}")
    if len(path) > 1:
        value = _set(getattr(obj, path[0]), path[1:], raw, key)
    else:
        value = _convert(raw, typing.get_type_hints(type(obj))[path[0]], key)
    field = f"{type(obj).__name__}.{path[0]}"
    try:
        return dataclasses.replace(obj, **{path[0]: value})
    except TypeError as err:
        # A __post_init__ that compares or calls the new value can fail with a TypeError
        # (None > 0, ...): the CLI reports it like any invalid value, not as a traceback.
        raise ValueError(f"--set {key}={raw}: invalid value for {field} ({err})") from err
    except ValueError as err:
        if str(err).startswith("--set"):
            raise
        raise ValueError(f"--set {key}={raw}: {err}") from err
