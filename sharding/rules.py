"""Logical-axis rule presets: how the model's logical axis names map onto mesh axes.

The model names every parameter and activation dimension logically (`embed`, `heads`, `exp`,
`activation_batch`, ...); a preset maps each name to mesh axes (`data`, `fsdp`, `expert`,
`tensor`). Names absent from a table are replicated. Mesh axes of size 1 cost nothing, so one
table serves every mesh shape; a dimension whose size the mesh axes do not divide is kept
whole (see sharding.partition).
"""

from __future__ import annotations

import enum

# Tokens are split over every mesh axis except `tensor`: expert-parallel devices also run
# attention on their own tokens, as in V3 (EP 64 with data-parallel attention).
BATCH_AXES = ("data", "fsdp", "expert")


class Rules(enum.Enum):
    """A parallelism strategy; `table()` gives its (logical name, mesh axes) pairs."""

    DATA = "data"  # parameters replicated, the batch split over every device
    FSDP = "fsdp"  # + parameters and optimizer state split over `fsdp` (ZeRO-3 style)
    FSDP_EP = "fsdp_ep"  # + routed experts split over `expert` (tokens go to their experts)
    FSDP_EP_TP = "fsdp_ep_tp"  # + heads, FFN width and vocabulary split over `tensor`

    def table(self) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
        return _TABLES[self]


_DATA = (("activation_batch", BATCH_AXES),)

_FSDP = (
    *_DATA,
    ("embed", ("fsdp",)),  # every matrix touching the residual stream
    ("q_lora", ("fsdp",)),  # wq_b [q_lora, heads, kv]
    ("kv_lora", ("fsdp",)),  # wkv_b [kv_lora, heads, kv]
)

_FSDP_EP = (
    *_FSDP,
    ("exp", ("expert",)),  # routed expert weights [exp, embed, mlp] and router biases
)

_FSDP_EP_TP = (
    *_FSDP_EP,
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),  # GQA's K/V heads (kept whole when tensor does not divide them)
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("activation_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
)

_TABLES = {
    Rules.DATA: _DATA,
    Rules.FSDP: _FSDP,
    Rules.FSDP_EP: _FSDP_EP,
    Rules.FSDP_EP_TP: _FSDP_EP_TP,
}


def mesh_axes_of(rules: Rules, logical: str) -> tuple[str, ...]:
    """The mesh axes a logical name maps to under these rules (empty: replicated)."""
    for name, axes in rules.table():
        if name == logical:
            return tuple(axes or ())
    return ()


def describe(rules: Rules) -> str:
    """The table as aligned text (for logs and the README)."""
    rows = [
        f"  {name:<18} -> {', '.join(axes or ('(replicated)',))}" for name, axes in rules.table()
    ]
    return f"{rules.value}:\n" + "\n".join(rows)
