"""Quickstart: initialize a preset, run one jitted forward/backward on a generated batch.

    python -m experiments quickstart [--set model=v2lite-tiny --set batch=2]

Runtime: ~50 s on 2 CPU cores (mostly compilation). Expected result for v3-tiny at random
init: CE and MTP CE near ln(vocab) = 7.6, a non-zero gradient norm, per-layer expert
counts that sum to batch x seq x top_k, and the parameter counts of every preset, with
v3-671b at 671B total / 36.6B activated / 11.6B MTP. (Replaced by pre-training later.)
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import optax

import model
from train.step import LossConfig, objective


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    model: str = "v3-tiny"
    batch: int = 4
    seq_len: int = 128
    seed: int = 0
    mtp_weight: float = 0.3  # lambda of the MTP loss (V3: 0.3 early, then 0.1)
    balance_weight: float = 1e-4  # alpha of the sequence-wise balance loss (V3)

    def __post_init__(self):
        model.presets.get(self.model)  # fails early, listing the valid names
        for name in ("batch", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"QuickstartConfig.{name} must be > 0")


def get_config() -> QuickstartConfig:
    return QuickstartConfig()


def generated_batch(key: jax.Array, batch: int, seq_len: int, vocab: int) -> dict:
    """Random tokens in the train step's batch contract (one document per row)."""
    tokens = jax.random.randint(key, (batch, seq_len + 1), 0, vocab)
    ones = jnp.ones((batch, seq_len), jnp.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": ones,
        "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
        "loss_mask": ones.astype(jnp.float32),
    }


def run(config: QuickstartConfig, run_dir=None) -> dict:
    """Forward/backward once and print; nothing is written (run_dir is unused)."""
    del run_dir
    cfg = model.presets.get(config.model)
    if config.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds {config.model}'s {cfg.max_seq_len}")
    key_init, key_data = jax.random.split(jax.random.key(config.seed))
    variables = model.init(cfg, key_init)
    params = variables.pop("params")
    batch = generated_batch(key_data, config.batch, config.seq_len, cfg.vocab_size)
    loss_cfg = LossConfig(mtp_weight=config.mtp_weight, balance_weight=config.balance_weight)

    def loss_fn(params):
        return objective(cfg, loss_cfg, {"params": params, **variables}, batch, jnp.int32(0))

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    start = time.perf_counter()
    (loss, (metrics, aux)), grads = grad_fn(params)
    loss = float(loss)
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(grad_fn(params))
    step = time.perf_counter() - start

    grad_norm = float(optax.global_norm(grads))
    print(
        f"\n{config.model}: loss {loss:.4f} (CE {float(metrics['ce']):.4f}, "
        f"MTP {float(metrics['mtp_loss']):.4f}, balance {float(metrics['balance_loss']):.4f}), "
        f"grad norm {grad_norm:.4f}"
    )
    print(
        f"first call (compile + run) {compile_and_run:.1f} s, "
        f"forward/backward {step * 1e3:.0f} ms, {config.batch * config.seq_len / step:.0f} tokens/s"
    )
    if aux.expert_counts is not None:
        print("expert token counts per MoE layer:")
        for layer, counts in enumerate(jax.device_get(aux.expert_counts)):
            print(f"  layer {cfg.num_dense_layers + layer}: {counts.tolist()}")
    print("\nparameter counts (jax.eval_shape, nothing allocated):")
    for name in model.presets.names():
        print(f"  {name:12s} {model.count_params(model.presets.get(name))}")
    return {"loss": loss, "grad_norm": grad_norm}
