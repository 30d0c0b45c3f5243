"""A run dir holds one run: a rerun with a config that would change the trained state or its
data is refused before anything is written.

Every trainer (pre-training, GRPO, and the SFT, reward-model and distillation trainers to
come) goes through `train.loop.TrainLoop`, which calls `check_run_dir` first with the
trainer's config as JSON data and the dotted fields that are safe to change on resume (the
number of steps, eval and checkpoint cadence, progress, plots, the mesh). Any other
difference from the run dir's `config.json` raises `ConfigMismatchError`, naming each field
with its old and new values and how to proceed. Only once the checkpoints have been restored
(or there are none) is the config written (`write_config`); an accepted change is logged and
appended to `config_changes.jsonl`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
_ABSENT = "<absent>"


class ConfigMismatchError(ValueError):
    """A rerun's config differs from the run dir's in a field that changes the state or data."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One differing leaf of two configs: its dotted path, old and new values."""

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {json.dumps(self.old)} -> {json.dumps(self.new)}"


def to_json(obj: Any) -> Any:
    """A config (nested frozen dataclasses) as JSON-ready data (enums by value)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_json(x) for x in obj]
    return obj


def _same(a: Any, b: Any) -> bool:
    # Through JSON text so that NaN equals NaN and tuples equal lists.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def config_changes(old: Any, new: Any, prefix: str = "") -> list[Change]:
    """The leaves where two JSON configs differ, as dotted paths (`model.mla.num_heads`)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            path = f"{prefix}.{key}" if prefix else str(key)
            out += config_changes(old.get(key, _ABSENT), new.get(key, _ABSENT), path)
        return out
    return [] if _same(old, new) else [Change(prefix or "<config>", old, new)]


def is_safe(path: str, safe: Collection[str]) -> bool:
    """Whether `path` is one of `safe` or lies under one (`loop` covers `loop.steps`)."""
    return any(path == s or path.startswith(s + ".") for s in safe)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigMismatchError(
            f"{path} is not readable JSON ({err}): this run dir's config is unknown, so it "
            "cannot be resumed safely; use a new run dir, or fix or delete that file"
        ) from err


def check_run_dir(
    run_dir: str | Path,
    config: Mapping[str, Any],
    *,
    safe: Collection[str],
    allow_change: bool,
    override: str,
) -> list[Change]:
    """The differences of `config` from run_dir/config.json (none for a new run dir); raises
    ConfigMismatchError for one outside `safe` unless `allow_change`. Writes nothing.
    `override` names the setting that sets allow_change (for the message)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return []
    changes = config_changes(_read(path), json.loads(json.dumps(config)))
    unsafe = [c for c in changes if not is_safe(c.path, safe)]
    if unsafe and not allow_change:
        listing = "\n".join(f"  {c}" for c in unsafe)
        raise ConfigMismatchError(
            f"run dir {run_dir} holds a run with a different config ({path}). These "
            f"fields change the trained state or its data:\n{listing}\n"
            "Resuming would mix two runs. Write to a new --run-dir, or, to continue this "
            f"run's checkpoints under the new values anyway, set {override}. Fields that "
            f"may change on resume: {', '.join(sorted(safe))}."
        )
    for change in changes:
        note = "" if is_safe(change.path, safe) else f" (allowed by {override})"
        log.warning("%s: resuming with %s%s", run_dir, change, note)
    return changes


def digest(data: Any) -> str:
    """A short stable hash of JSON-able data (what a run config records of large inputs,
    e.g. its task list), keys sorted."""
    text = json.dumps(data, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_config(run_dir: str | Path, config: Mapping[str, Any], changes: list[Change]) -> None:
    """Write run_dir/config.json (atomically) and append `changes` to config_changes.jsonl."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if changes:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | {
            "changes": [dataclasses.asdict(c) for c in changes]
        }
        with (run_dir / CHANGES_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")
    path = run_dir / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
