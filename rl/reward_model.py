"""A scalar reward model: any jaxseek model with a linear head read at the response's last
token, trained on preference pairs with the Bradley-Terry loss.

    r(x) = w . h_last(x) + b        h_last: the final-normed hidden state at the last real
                                    token, the end-of-sentence that closes the response
    loss = -log sigmoid(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2

The margin (per pair, default 0) asks for a larger gap on clearer preferences (Llama 2's
reward models); the centering term (c, default 0) keeps rewards near zero, so they can be
added to rule rewards without an offset. Parameters are {"backbone": the model's params,
"head": {"w" [D], "b" []}}; the MoE router biases stay as the base left them.

A batch of P pairs holds inputs, positions and segment_ids [P, 2, T] (response 0 chosen,
1 rejected; segment 0 = padding, on either side), margin [P] and weight [P] (0: a padding
pair). Pairs lead every array, so a batch shards and splits across hosts by pair.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import model
from model import ModelConfig


@dataclasses.dataclass(frozen=True)
class RewardLossConfig:
    """Bradley-Terry with optional per-pair margins (from the data) and reward centering."""

    center_weight: float = 0.0

    def __post_init__(self):
        if not self.center_weight >= 0:
            raise ValueError(
                f"RewardLossConfig.center_weight = {self.center_weight!r}: must be >= 0"
            )


def init_head(cfg: ModelConfig, rng: jax.Array) -> dict:
    """{"w": [D] ~ N(0, 1 / (D + 1)), "b": 0}: rewards of order 1 from the start."""
    w = jax.random.normal(rng, (cfg.d_model,), jnp.float32) / np.sqrt(cfg.d_model + 1)
    return {"w": w, "b": jnp.zeros((), jnp.float32)}


def init_params(cfg: ModelConfig, backbone_params: dict, rng: jax.Array) -> dict:
    """Reward-model params from a language model's params (the LM head is kept, unused)."""
    return {"backbone": backbone_params, "head": init_head(cfg, rng)}


def last_token(segment_ids: jax.Array) -> jax.Array:
    """Index [B] of each row's last real (segment != 0) position, wherever the padding is."""
    T = segment_ids.shape[1]
    return T - 1 - jnp.argmax((segment_ids != 0)[:, ::-1], axis=1)


def scores(cfg: ModelConfig, params: dict, router_bias: dict, batch: dict) -> jax.Array:
    """Rewards [B] float32 of the batch's rows, read at each row's last real token."""
    variables = {"params": params["backbone"], "router_bias": router_bias}
    hidden = model.forward(
        cfg,
        variables,
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    ).hidden
    last = last_token(batch["segment_ids"])
    h_BxD = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return h_BxD @ params["head"]["w"] + params["head"]["b"]


def pair_scores(cfg: ModelConfig, params: dict, router_bias: dict, batch: dict) -> jax.Array:
    """Rewards [P, 2] (chosen, rejected) of a batch of pairs."""
    P, _, T = batch["inputs"].shape
    rows = {k: batch[k].reshape(2 * P, T) for k in ("inputs", "positions", "segment_ids")}
    return scores(cfg, params, router_bias, rows).reshape(P, 2)


def pair_loss(
    loss_cfg: RewardLossConfig,
    rewards_Px2: jax.Array,
    margin: jax.Array,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """(Bradley-Terry loss + centering, metrics), means over the pairs of `weight` 1."""
    chosen, rejected = rewards_Px2[:, 0], rewards_Px2[:, 1]
    weight = jnp.ones_like(chosen) if weight is None else weight
    mean = lambda x: jnp.sum(weight * x) / jnp.maximum(jnp.sum(weight), 1.0)
    gap = chosen - rejected
    bt = -jax.nn.log_sigmoid(gap - margin)
    loss = mean(bt) + loss_cfg.center_weight * mean(jnp.square(chosen + rejected))
    metrics = {
        "loss": loss,
        "bt_loss": mean(bt),
        "accuracy": mean((gap > 0).astype(jnp.float32)),
        "reward_gap": mean(gap),
        "reward_mean": mean((chosen + rejected) / 2),
    }
    return loss, metrics


def objective(
    cfg: ModelConfig, loss_cfg: RewardLossConfig, params: dict, router_bias: dict, batch: dict
) -> tuple[jax.Array, dict]:
    """The loss of a batch of pairs and its metrics (pairwise accuracy among them)."""
    rewards = pair_scores(cfg, params, router_bias, batch)
    return pair_loss(loss_cfg, rewards, batch["margin"], batch.get("weight"))


def pad_rows(rows: list[np.ndarray], length: int, *, left: bool = False) -> dict:
    """inputs, positions (0 at each row's first token) and segment_ids [B, length] of token
    rows, padded on the right (default) or the left."""
    B = len(rows)
    out = {k: np.zeros((B, length), np.int32) for k in ("inputs", "positions", "segment_ids")}
    for i, ids in enumerate(rows):
        n = len(ids)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than the length {length}")
        span = slice(length - n, length) if left else slice(0, n)
        out["inputs"][i, span] = ids
        out["positions"][i, span] = np.arange(n)
        out["segment_ids"][i, span] = 1
    return out
