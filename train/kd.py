"""Logit-level knowledge distillation inside SFT: the teacher, the divergence and its weight.

With `SFTConfig.kd` set, every batch also goes through the teacher (a jitted forward with no
gradients, batched like the student's) and the loss is

    (1 - weight) * CE + weight * D(student, teacher)

over the same trained tokens, both sums divided by the global number of trained tokens (so
packing, micro-batches and sharding leave the loss as it is). D is the forward KL, reverse KL
or generalised JSD of train/distill_loss.py, over the full vocabulary or the teacher's top k.
The teacher may be any jaxseek model (a V3 MoE teaching a dense student, or the reverse) that
shares the student's tokenizer; `check_same_vocabulary` refuses any other at start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

import model
from model import ModelConfig
from train.distill_loss import check_beta, teacher_topk, token_divergence, topk_divergence
from train.tokenizer import Tokenizer

TEACHER_LOGITS, TEACHER_IDS, TEACHER_LOGP = "teacher_logits", "teacher_ids", "teacher_logp"


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """The teacher (a run dir or a Hugging Face dir) and the distillation loss."""

    teacher_run: str | None = None
    teacher_hf: str | None = None
    weight: float = 0.5  # of the divergence; 1 - weight of the SFT cross-entropy
    beta: float = 0.0  # 0 forward KL, 1 reverse KL, between: generalised JSD
    temperature: float = 1.0
    top_k: int | None = None  # only the teacher's k most likely tokens (None: all)
    # Compute the teacher's top-k over the data once, to run_dir/teacher_topk.npz, instead of
    # running the teacher on every batch (train/kd_cache.py); needs top_k.
    precompute: bool = False

    def __post_init__(self):
        if (self.teacher_run is None) == (self.teacher_hf is None):
            raise ValueError("KDConfig: set exactly one of teacher_run and teacher_hf")
        if isinstance(self.weight, bool) or not 0 <= self.weight <= 1:
            raise ValueError(f"KDConfig.weight must be in [0, 1], got {self.weight!r}")
        check_beta(self.beta)
        if isinstance(self.temperature, bool) or not self.temperature > 0:
            raise ValueError(f"KDConfig.temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"KDConfig.top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.precompute and self.top_k is None:
            raise ValueError("KDConfig.precompute keeps the teacher's top-k on disk: set top_k")


def check_same_vocabulary(
    teacher_cfg: ModelConfig,
    teacher_tok: Tokenizer,
    student_cfg: ModelConfig,
    student_tok: Tokenizer,
) -> None:
    """Logit distillation compares distributions id by id: the tokenizers must map every
    token to the same id and the heads must have the same width."""
    t_vocab, s_vocab = teacher_tok.backend.get_vocab(), student_tok.backend.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])[:5]
        raise ValueError(
            f"KDConfig: the teacher's tokenizer ({len(t_vocab)} tokens) is not the student's "
            f"({len(s_vocab)}): e.g. only the teacher's {only_t}, other ids for {moved}. "
            "Logit distillation needs one vocabulary; distil across tokenizers by SFT on "
            "teacher-generated text (sequence-level distillation) instead"
        )
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ValueError(
            f"KDConfig: the teacher's head has {teacher_cfg.vocab_size} logits, the "
            f"student's {student_cfg.vocab_size}; one tokenizer, but the heads differ"
        )


def teacher_outputs(
    cfg: ModelConfig, variables: dict, kd: KDConfig, mask_documents: bool
) -> Callable[[dict], dict]:
    """batch -> the teacher's outputs the loss reads (full logits, or top-k ids and log-probs),
    from one jitted forward without gradients."""

    def outputs(variables_, batch):
        out = model.forward(
            cfg, variables_, batch["inputs"], positions=batch["positions"],
            segment_ids=batch["segment_ids"] if mask_documents else None,
        )  # fmt: skip
        logits = jax.lax.stop_gradient(out.logits)
        if kd.top_k is None:
            return {TEACHER_LOGITS: logits}
        ids, logp = teacher_topk(logits, kd.top_k)
        return {TEACHER_IDS: ids, TEACHER_LOGP: logp}

    jitted = jax.jit(outputs)
    return lambda batch: jitted(variables, batch)


def kd_sum(kd: KDConfig, student_logits: jax.Array, batch: dict, mask: jax.Array) -> jax.Array:
    """Sum of the per-token divergence over the trained positions `mask`."""
    if TEACHER_LOGITS in batch:
        div = token_divergence(student_logits, batch[TEACHER_LOGITS], kd.beta, kd.temperature)
    elif TEACHER_IDS in batch:
        div = topk_divergence(
            student_logits, batch[TEACHER_IDS], batch[TEACHER_LOGP], kd.beta, kd.temperature
        )
    else:
        raise ValueError("a distillation batch needs the teacher's outputs (kd.teacher_outputs)")
    return (div * mask).sum().astype(jnp.float32)
