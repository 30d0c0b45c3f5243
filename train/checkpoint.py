"""Orbax checkpoints of the train state and the data iterator, with a fallback on damage.

A checkpoint holds `state` (params, optimizer state, router bias, step, RNG key data, skipped
count), `data` (the grain iterator state, so a resumed run sees exactly the batches it would
have seen) and `meta` (JSON: the experiment config). Orbax writes each step to a temporary
folder and renames it when complete, so an interrupted save never looks finished.

Two failures are told apart: a checkpoint whose saved shapes or structure do not match the
state asked for is *incompatible* (`IncompatibleCheckpointError`, naming the leaves: another
model's checkpoint, never silently skipped); one whose metadata or arrays do not read back
is *damaged*, reported with a warning, and the previous checkpoint is used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import orbax.checkpoint as ocp

from train.state import TrainState

log = logging.getLogger(__name__)

_SHOWN = 12  # mismatching leaves named in an error


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's shapes or structure differ from the state it is restored into."""


def _to_saveable(state: TrainState) -> dict:
    # Typed PRNG keys are stored as their raw uint32 data.
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "router_bias": state.router_bias,
        "rng": jax.random.key_data(state.rng),
        "skipped": state.skipped,
    }


def _from_saveable(tree: dict, like: TrainState) -> TrainState:
    return TrainState(
        step=tree["step"],
        params=tree["params"],
        opt_state=jax.tree.unflatten(
            jax.tree.structure(like.opt_state), jax.tree.leaves(tree["opt_state"])
        ),
        router_bias=tree["router_bias"],
        rng=jax.random.wrap_key_data(tree["rng"]),
        skipped=tree["skipped"],
    )


def _abstract_on_device(x) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct with a sharding (the default device when x has none)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes_by_path(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {_path(p): tuple(getattr(leaf, "shape", ())) for p, leaf in leaves}


def _mismatches(item: str, saved, wanted, *, partial: bool) -> list[str]:
    """Leaves of `wanted` (arrays or ShapeDtypeStructs) whose shape differs from the saved
    metadata's, or that it lacks; without `partial`, also saved leaves `wanted` lacks. The
    optimizer state is compared leaf by leaf in order (its containers round-trip as lists)."""
    out = []
    if not partial and isinstance(wanted, dict) and "opt_state" in wanted:
        a = [tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(saved.get("opt_state", {}))]
        b = [tuple(x.shape) for x in jax.tree.leaves(wanted["opt_state"])]
        if a != b:
            out.append(f"{item}/opt_state: {len(a)} saved leaves {a[:4]}..., {len(b)} wanted")
        saved = {k: v for k, v in saved.items() if k != "opt_state"}
        wanted = {k: v for k, v in wanted.items() if k != "opt_state"}
    have, want = _shapes_by_path(saved), _shapes_by_path(wanted)
    for path, shape in want.items():
        if path not in have:
            out.append(f"{item}/{path}: not in the checkpoint (wanted shape {shape})")
        elif have[path] != shape:
            out.append(f"{item}/{path}: saved shape {have[path]}, this config's {shape}")
    if not partial:
        extra = [p for p in have if p not in want]
        out += [f"{item}/{p}: in the checkpoint only (shape {have[p]})" for p in extra]
    return out


def _incompatible(step: int, directory: Path, problems: list[str]) -> IncompatibleCheckpointError:
    shown = "\n  ".join(problems[:_SHOWN])
    if len(problems) > _SHOWN:
        shown += f"\n  ... and {len(problems) - _SHOWN} more"
    return IncompatibleCheckpointError(
        f"checkpoint {step} under {directory} does not fit this config (another model's or "
        f"optimizer's state?):\n  {shown}\nIt is not damaged, so it is not skipped: use a new "
        "run dir, or move the checkpoints away to start over"
    )


class Restored(NamedTuple):
    """What `restore_latest` read back: the state, the meta JSON and the extra tree (None
    when none was asked for)."""

    state: TrainState
    meta: dict
    extra: Any


class Checkpointer:
    """Saves every `every` steps, keeps the last `keep`, restores the newest readable one."""

    def __init__(self, directory: str | Path, *, every: int, keep: int):
        if every <= 0 or keep <= 0:
            raise ValueError(f"checkpoint every={every} and keep={keep} must both be > 0")
        self.directory = Path(directory).absolute()
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(
        self,
        state: TrainState,
        data_iterator: Any | None,
        meta: dict,
        *,
        force=False,
        extra: Any | None = None,
    ):
        """Save at state.step (asynchronously; call `wait` before reading it back). `extra`:
        another pytree of arrays saved beside the state (e.g. RL's reference policy)."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        items = {
            "state": ocp.args.StandardSave(_to_saveable(state)),
            "meta": ocp.args.JsonSave(meta),
        }
        if extra is not None:
            items["extra"] = ocp.args.StandardSave(extra)
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(
        self, like: TrainState, data_iterator: Any | None, *, extra_like: Any | None = None
    ) -> Restored | None:
        """(state, meta, extra) from the newest checkpoint that reads back; None when there
        is none.

        `like` (and `extra_like`, for a checkpoint saved with `extra`) give the structure,
        dtypes and shardings; `data_iterator` is restored in place.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if extra_like is not None:
            extra_abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, extra_like)
            items["extra"] = ocp.args.StandardRestore(extra_abstract)
        wanted = {"state": abstract} | ({"extra": extra_abstract} if extra_like is not None else {})
        found = self._restore_newest(items, wanted, partial=False)
        if found is None:
            return None
        restored, _ = found
        state = _from_saveable(restored["state"], like)
        return Restored(state, restored["meta"], restored.get("extra"))

    def restore_weights(self, like: dict) -> tuple[dict, int] | None:
        """({'params', 'router_bias'}, step) of the newest readable checkpoint, without the
        optimizer state or data iterator (for generation and evaluation). `like` holds arrays
        or ShapeDtypeStructs (with shardings) of the model's variables."""
        abstract = {k: like.get(k, {}) for k in ("params", "router_bias")}
        abstract = jax.tree.map(_abstract_on_device, abstract)
        restore = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        found = self._restore_newest({"state": restore}, {"state": abstract}, partial=True)
        if found is None:
            return None
        restored, step = found
        return dict(restored["state"]), step

    def _restore_newest(
        self, items: dict, wanted: dict, *, partial: bool
    ) -> tuple[Any, int] | None:
        """(restored items, step) of the newest checkpoint that restores; None if none.
        Raises IncompatibleCheckpointError when a readable checkpoint does not fit `wanted`."""
        self.wait()
        for step in reversed(self.steps()):
            folder = self.directory / str(step)
            absent = [name for name in wanted if not (folder / name).is_dir()]
            missing = [f"{name}: not in the checkpoint" for name in absent]
            try:
                handler = ocp.StandardCheckpointHandler()
                saved = {n: handler.metadata(folder / n).tree for n in wanted if n not in absent}
            except Exception as err:  # metadata that does not read back: a damaged checkpoint
                self._warn_damaged(step, err)
                continue
            problems = missing + [
                line
                for name, tree in saved.items()
                for line in _mismatches(name, tree, wanted[name], partial=partial)
            ]
            if problems:
                raise _incompatible(step, self.directory, problems)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # the arrays do not read back: try the previous one
                self._warn_damaged(step, err)
                continue
            return restored, step
        return None

    def _warn_damaged(self, step: int, err: Exception) -> None:
        log.warning(
            "checkpoint %d under %s is damaged (%s); falling back to the previous one",
            step,
            self.directory,
            f"{type(err).__name__}: {err}"[:300],
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
