"""A trained scalar reward model: read back from its run dir, and scored on preference pairs.

rm = load_reward_model("runs/rm")           # config, weights, tokenizer, how it reads pairs
score_pairs(rm, pairs)                      # pairwise accuracy, overall and per kind
rl.model_rewards.ScalarReward(rm)           # as a reward function
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import model
from model import ModelConfig
from rl import reward_data, reward_model
from rl.preferences import Pair
from rl.reward_data import PairDataConfig
from sharding.mesh import Parallel
from sharding.partition import global_batch
from train.data import TOKENIZER_FILE
from train.run import newest_weights
from train.run_dir import CONFIG_FILE
from train.tokenizer import Tokenizer


def pair_accuracy(
    cfg: ModelConfig,
    params: dict,
    router_bias: dict,
    data_cfg: PairDataConfig,
    pairs: Sequence[reward_data.RenderedPair],
    parallel: Parallel | None = None,
) -> dict[str, float]:
    """Pairwise accuracy (chosen scored above rejected), mean Bradley-Terry loss and reward gap
    over `pairs`, and the accuracy of each kind of pair."""
    score = _jitted_pair_scores(cfg)
    gaps, kinds = [], []
    for batch, batch_kinds in reward_data.eval_batches(data_cfg, pairs):
        if parallel is not None:
            batch = global_batch(parallel, batch)
        rewards = np.asarray(jax.device_get(score(params, router_bias, batch)))
        gaps += (rewards[: len(batch_kinds), 0] - rewards[: len(batch_kinds), 1]).tolist()
        kinds += batch_kinds
    gaps = np.asarray(gaps)
    margins = np.asarray([p.margin for p in pairs])
    out = {
        "accuracy": float(np.mean(gaps > 0)),
        "bt_loss": float(np.mean(np.logaddexp(0.0, -(gaps - margins)))),
        "reward_gap": float(np.mean(gaps)),
    }
    for kind in sorted(set(kinds) - {""}):
        picked = np.asarray(kinds) == kind
        out[f"accuracy_{kind}"] = float(np.mean(gaps[picked] > 0))
    return out


def score_pairs(rm: TrainedRewardModel, pairs: Sequence[Pair]) -> dict[str, float]:
    """`pair_accuracy` of a trained reward model on other pairs (e.g. unseen questions),
    rendered as it was trained; pairs too long for it are left out (counted)."""
    rendered = [reward_data.render_fitted(rm.data, rm.tokenizer, p) for p in pairs]
    kept = [r for r in rendered if r is not None]
    if not kept:
        raise ValueError(f"score_pairs: none of the {len(pairs)} pairs fits seq_len")
    out = pair_accuracy(rm.cfg, rm.params, rm.router_bias, rm.data, kept)
    return out | {"pairs": len(kept), "dropped_over_long": len(pairs) - len(kept)}


@functools.lru_cache(maxsize=8)  # one compilation per model, not one per evaluation
def _jitted_pair_scores(cfg: ModelConfig):
    return jax.jit(lambda p, rb, batch: reward_model.pair_scores(cfg, p, rb, batch))


@dataclasses.dataclass(frozen=True)
class TrainedRewardModel:
    """A reward model read back from its run dir, ready to score."""

    cfg: ModelConfig
    params: dict
    router_bias: dict
    tokenizer: Tokenizer
    data: PairDataConfig  # its layout and scope are how it reads responses
    step: int


def load_reward_model(run_dir: str | Path) -> TrainedRewardModel:
    """The model config, tokenizer, rendering settings and newest weights of a reward-model
    run dir (written by `train_reward_model`)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory")
    saved = json.loads(path.read_text())
    if "model" not in saved or "batch_pairs" not in saved.get("data", {}):
        raise ValueError(
            f"{path} is not a reward-model run's config (no model, or no pair data): "
            f"{run_dir} was not written by rl.reward_trainer.train_reward_model"
        )
    tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
    cfg = ModelConfig.from_dict(saved["model"]).replace(vocab_size=tokenizer.vocab_size)
    data = _data_config(saved["data"])
    variables, step = newest_weights(run_dir, jax.eval_shape(lambda: _abstract_variables(cfg)))
    return TrainedRewardModel(
        cfg, variables["params"], variables.get("router_bias", {}), tokenizer, data, step
    )


def _abstract_variables(cfg: ModelConfig) -> dict:
    variables = model.init(cfg, jax.random.key(0))
    params = reward_model.init_params(cfg, variables["params"], jax.random.key(0))
    return {"params": params, "router_bias": variables.get("router_bias", {})}


def _data_config(saved: dict) -> PairDataConfig:
    """PairDataConfig from its config.json form (enums by value)."""
    defaults = PairDataConfig()
    values = {}
    for field in dataclasses.fields(PairDataConfig):
        if field.name in saved:
            default, value = getattr(defaults, field.name), saved[field.name]
            values[field.name] = type(default)(value) if isinstance(default, enum.Enum) else value
    return PairDataConfig(**values)
