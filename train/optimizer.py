"""AdamW with DeepSeek-V3's defaults and the V3 learning-rate schedule shape.

V3: betas (0.9, 0.95), weight decay 0.1, global-norm clipping 1.0; the learning rate warms up
linearly, stays constant, decays along a cosine to 10% of its peak, holds there, and ends on
a lower constant (2.2e-4 -> 2.2e-5 -> 7.3e-6 in the report). Norm scales and biases get no
weight decay; the router correction bias is not a parameter at all (collection `router_bias`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


def _check(obj, name: str, ok: bool, valid: str) -> None:
    if not ok:
        value = getattr(obj, name)
        raise ValueError(f"{type(obj).__name__}.{name} = {value!r}: must be {valid}")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Warmup, constant, cosine decay to min_lr, constant min_lr, then final_lr forever."""

    peak_lr: float = 2.2e-4
    warmup_steps: int = 2000
    constant_steps: int = 0
    decay_steps: int = 0
    min_lr: float = 2.2e-5
    min_steps: int = 0
    final_lr: float = 7.3e-6

    def __post_init__(self):
        for name in ("peak_lr", "min_lr", "final_lr"):
            _check(self, name, getattr(self, name) >= 0, ">= 0")
        for name in ("warmup_steps", "constant_steps", "decay_steps", "min_steps"):
            value = getattr(self, name)
            _check(self, name, isinstance(value, int) and value >= 0, "an int >= 0")
        if self.decay_steps > 0:
            # The cosine is optax's, a fraction of peak_lr: it needs a peak to decay from.
            _check(self, "peak_lr", self.peak_lr > 0, "> 0 when decay_steps > 0")

    @property
    def boundaries(self) -> list[int]:
        """Steps at which warmup, constant, decay and the min-lr phase end."""
        ends, total = [], 0
        for length in (self.warmup_steps, self.constant_steps, self.decay_steps, self.min_steps):
            total += length
            ends.append(total)
        return ends

    def to_optax(self) -> optax.Schedule:
        """The schedule as optax combinators (a phase of length 0 is never entered)."""
        # optax refuses a cosine over 0 steps; such a phase is skipped by join_schedules anyway.
        cosine = (
            optax.cosine_decay_schedule(
                self.peak_lr, self.decay_steps, alpha=self.min_lr / self.peak_lr
            )
            if self.decay_steps > 0
            else optax.constant_schedule(self.min_lr)
        )
        phases = [
            optax.linear_schedule(0.0, self.peak_lr, self.warmup_steps),
            optax.constant_schedule(self.peak_lr),
            cosine,
            optax.constant_schedule(self.min_lr),
            optax.constant_schedule(self.final_lr),
        ]
        return optax.join_schedules(phases, self.boundaries)

    def __call__(self, step: jax.Array | int) -> jax.Array:
        return jnp.asarray(self.to_optax()(jnp.asarray(step, jnp.int32)), jnp.float32)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + clipping; defaults are V3's."""

    schedule: LRSchedule = dataclasses.field(default_factory=LRSchedule)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    moments_dtype: str = "float32"  # V3 keeps AdamW moments in bfloat16

    def __post_init__(self):
        for name in ("b1", "b2"):
            _check(self, name, 0 <= getattr(self, name) < 1, "in [0, 1)")
        _check(self, "eps", self.eps > 0, "> 0")
        _check(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        _check(self, "clip_norm", self.clip_norm > 0, "> 0")
        _check(
            self,
            "moments_dtype",
            self.moments_dtype in ("float32", "bfloat16"),
            "float32 or bfloat16",
        )


def decay_mask(params) -> dict:
    """True for leaves that get weight decay: matrices, not norm scales or biases."""

    def decays(path, leaf) -> bool:
        name = getattr(path[-1], "key", None)
        return name not in ("scale", "bias") and leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(V3 schedule) with the decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate=cfg.schedule.to_optax(),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mu_dtype=jnp.dtype(cfg.moments_dtype),
            mask=decay_mask,
        ),
    )


def update_count(opt_state: optax.OptState) -> jax.Array | None:
    """Updates the optimizer has applied: the step its learning-rate schedule reads (int32).

    None for an optimizer without a schedule (a constant learning rate). A dropped
    (non-finite) step leaves it where it was, so it can run behind the train state's step.
    """
    found = optax.tree_utils.tree_get(opt_state, "ScaleByScheduleState")
    return None if found is None else found.count
