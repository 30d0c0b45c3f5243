"""Per-token divergences between a student's and a teacher's next-token distributions.

`beta` picks the divergence, as TRL's GKD trainer does: 0 is the forward KL(teacher || student)
(what sequence-level and classic logit KD minimise: the student covers the teacher's modes),
1 the reverse KL(student || teacher) (mode-seeking; on-policy distillation's), and a beta
between is the generalised Jensen-Shannon divergence

    JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M),   M = beta T + (1 - beta) S,

which vanishes at both ends; JSD_beta / beta tends to the forward KL as beta -> 0 and
JSD_beta / (1 - beta) to the reverse KL as beta -> 1, so the end points are set exactly. Both
distributions are softened by `temperature` and the divergence is scaled by temperature^2
(Hinton et al.), so its gradients keep their size as the temperature changes.

From top-k teacher log-probs (precomputed, or to save memory) the divergence is taken over
the teacher's k tokens alone: the teacher's kept probabilities are renormalised to sum to one,
and so are the student's over the same k tokens; the tail is dropped from both (the student
is not pushed to put zero mass there, and the reverse KL stays finite).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {beta!r}")


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities (0 log 0 = 0)."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def divergence_from_logprobs(
    student_logp: jax.Array, teacher_logp: jax.Array, beta: float
) -> jax.Array:
    """Per-position divergence [...] between two normalised log-distributions [..., V]."""
    check_beta(beta)
    if beta == 0:
        return _kl(teacher_logp, student_logp)
    if beta == 1:
        return _kl(student_logp, teacher_logp)
    mixture = jnp.logaddexp(teacher_logp + jnp.log(beta), student_logp + jnp.log1p(-beta))
    return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)


def token_divergence(
    student_logits: jax.Array, teacher_logits: jax.Array, beta: float, temperature: float = 1.0
) -> jax.Array:
    """Per-position divergence [B, T] from full logits [B, T, V] (computed in float32)."""
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "differ: logit distillation needs the same vocabulary"
        )
    soften = lambda x: jax.nn.log_softmax(x.astype(jnp.float32) / temperature, axis=-1)
    div = divergence_from_logprobs(soften(student_logits), soften(teacher_logits), beta)
    return div * temperature**2


def topk_divergence(
    student_logits: jax.Array,
    teacher_ids: jax.Array,
    teacher_logp: jax.Array,
    beta: float,
    temperature: float = 1.0,
) -> jax.Array:
    """Per-position divergence [B, T] over the teacher's top k tokens: teacher_ids [B, T, k]
    and their log-probs [B, T, k] (at temperature 1, as stored); both sides renormalised."""
    _check_temperature(temperature)
    student = jnp.take_along_axis(student_logits.astype(jnp.float32), teacher_ids, axis=-1)
    soften = lambda x: jax.nn.log_softmax(x / temperature, axis=-1)
    # log p_T / tau renormalised over the k tokens is the kept teacher at temperature tau.
    teacher = soften(teacher_logp.astype(jnp.float32))
    return divergence_from_logprobs(soften(student), teacher, beta) * temperature**2


def teacher_topk(teacher_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(ids [.., k], log-probs [.., k]) of the teacher's k most likely tokens at each position."""
    logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(logp, k)
    return ids.astype(jnp.int32), values


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
