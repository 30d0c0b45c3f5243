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

    @property
    def boundaries(self) -> list[int]:
        """Steps at which warmup, constant, decay and the min-lr phase end."""
        ends, total = [], 0
        for length in (self.warmup_steps, self.constant_steps, self.decay_steps, self.min_steps):
            total += length
            ends.append(total)
        return ends

    def __call__(self, step: jax.Array | int) -> jax.Array:
        warm_end, const_end, decay_end, min_end = self.boundaries
        step = jnp.asarray(step, jnp.float32)
        warmup = self.peak_lr * step / max(self.warmup_steps, 1)
        progress = jnp.clip((step - const_end) / max(self.decay_steps, 1), 0.0, 1.0)
        cosine = self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.select(
            [step < warm_end, step < const_end, step < decay_end, step < min_end],
            [warmup, jnp.full_like(step, self.peak_lr), cosine, jnp.full_like(step, self.min_lr)],
            jnp.full_like(step, self.final_lr),
        )


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
            learning_rate=cfg.schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mu_dtype=jnp.dtype(cfg.moments_dtype),
            mask=decay_mask,
        ),
    )
