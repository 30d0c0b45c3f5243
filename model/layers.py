"""Small building blocks shared by the attention, MoE and transformer modules."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import FP8Config, ModelConfig, rules_table
from pallas_kernels.fp8_linear import fp8_linear

BTF = ("activation_batch", "activation_length", "activation_mlp")


@contextlib.contextmanager
def axis_rules(cfg: ModelConfig) -> Iterator[None]:
    """Trace the model under cfg.logical_rules, whatever the caller's flax context holds.

    The model's entry points (init, forward, prefill, extend) run inside this, so the rules a
    jitted function traced with are those of its static config. Rules set by the caller with
    flax's nn.logical_axis_rules that differ are an error rather than silently ignored."""
    ambient = tuple(nn.get_logical_axis_rules())
    if ambient and rules_table(ambient) != cfg.logical_rules:
        raise ValueError(
            "the model lays itself out by ModelConfig.logical_rules, not by flax's "
            "nn.logical_axis_rules context; set cfg.logical_rules (Parallel.configure(cfg) "
            f"gives the mesh's), got context rules {ambient} and cfg rules {cfg.logical_rules}"
        )
    with nn.logical_axis_rules(cfg.logical_rules):
        yield


def partitioned_normal(std: float, names: Sequence[str | None]):
    """A normal(std) initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(names))


def partitioned_ones(names: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(names))


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled by a learned per-channel multiplier."""

    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", partitioned_ones((self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def fp8_dot(x: jax.Array, w_KxN: jax.Array, fp8: FP8Config) -> jax.Array:
    """x [..., K] @ w [K, N] with V3's FP8 Fprop/Dgrad/Wgrad (kernel interpreted on CPU)."""
    return fp8_linear(
        x,
        w_KxN,
        use_kernel=fp8.use_kernel,
        interpret=jax.default_backend() == "cpu",
        pow2_scale=fp8.pow2_scale,
    )


def project(
    x: jax.Array, w: jax.Array, in_dims: int = 1, fp8: FP8Config | None = None
) -> jax.Array:
    """Contract the last `in_dims` axes of x with the first `in_dims` axes of w (FP8 if set).

    Done as one 2D matmul over flattened tokens: XLA:CPU runs the backward of a 3D
    `btd,df->btf` (a contraction over b and t) several times slower than the 2D form.
    """
    lead, k = x.shape[: x.ndim - in_dims], math.prod(x.shape[x.ndim - in_dims :])
    if fp8 is None:
        y = x.reshape(-1, k) @ w.reshape(k, -1)
    else:
        y = fp8_dot(x.reshape(-1, k), w.reshape(k, -1), fp8)
    return y.reshape(*lead, *w.shape[in_dims:])


class Linear(nn.Module):
    """A bias-free projection [.., in] -> [.., features] with a logically named kernel."""

    features: int
    kernel_axes: tuple[str | None, str | None]
    init_std: float
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            partitioned_normal(self.init_std, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        return project(x.astype(self.dtype), jnp.asarray(kernel, self.dtype))


def swiglu(x: jax.Array, wi_gate: jax.Array, wi_up: jax.Array, wo: jax.Array) -> jax.Array:
    """w2(silu(w1 x) * w3 x) with kernels laid out [in, out]."""
    return (jax.nn.silu(x @ wi_gate) * (x @ wi_up)) @ wo


class MLP(nn.Module):
    """SwiGLU feed-forward block (dense layers and shared experts)."""

    hidden_dim: int
    init_std: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    fp8: FP8Config | None = None

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        d = x_BxTxD.shape[-1]
        init_in = partitioned_normal(self.init_std, ("embed", "mlp"))
        init_out = partitioned_normal(self.init_std, ("mlp", "embed"))
        wi_gate = self.param("wi_gate", init_in, (d, self.hidden_dim), self.param_dtype)
        wi_up = self.param("wi_up", init_in, (d, self.hidden_dim), self.param_dtype)
        wo = self.param("wo", init_out, (self.hidden_dim, d), self.param_dtype)
        if self.fp8 is None:
            dot = lambda x, w: x @ jnp.asarray(w, self.dtype)
        else:
            dot = lambda x, w: fp8_dot(x, jnp.asarray(w, self.dtype), self.fp8)
        h = jax.nn.silu(dot(x_BxTxD, wi_gate)) * dot(x_BxTxD, wi_up)
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        return dot(h, wo)
