"""Reading a run directory back: its model config, tokenizer and latest weights.

A run dir (written by train.pretrain and the later pipelines) holds config.json (the
experiment config, with the model under "model"), tokenizer.json and checkpoints/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax

import model
from model import ModelConfig
from train.checkpoint import Checkpointer
from train.data import TOKENIZER_FILE
from train.run_dir import CONFIG_FILE
from train.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model ready for model.generate / model.forward."""

    cfg: ModelConfig
    variables: dict
    tokenizer: Tokenizer
    step: int


def model_config(run_dir: str | Path) -> ModelConfig:
    """The run's ModelConfig, vocabulary size from its tokenizer."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory")
    try:
        data = json.loads(path.read_text())["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} has no readable 'model' section ({err})") from err
    return ModelConfig.from_dict(data)


def latest_weights(run_dir: str | Path, cfg: ModelConfig) -> tuple[dict, int]:
    """({'params', 'router_bias'}, step) of the run's newest readable checkpoint, shaped for
    cfg (which may differ from the run's own in shape-free settings such as YaRN)."""
    like = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
    return newest_weights(run_dir, like)


def newest_weights(run_dir: str | Path, like: dict) -> tuple[dict, int]:
    """({'params', 'router_bias'}, step) of the run's newest readable checkpoint, shaped like
    `like` (arrays or ShapeDtypeStructs: a model's variables, or a reward model's)."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"{checkpoints} does not exist: the run saved no checkpoint")
    checkpointer = Checkpointer(checkpoints, every=1, keep=1_000_000)
    try:
        found = checkpointer.restore_weights(like)
    finally:
        checkpointer.close()
    if found is None:
        raise FileNotFoundError(f"no readable checkpoint under {checkpoints}")
    return found


def load_run(run_dir: str | Path) -> Run:
    """The config, tokenizer and newest readable checkpoint of a run directory."""
    run_dir = Path(run_dir)
    cfg = model_config(run_dir)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} does not exist")
    tokenizer = Tokenizer.load(tokenizer_path)
    cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    variables, step = latest_weights(run_dir, cfg)
    return Run(cfg=cfg, variables=variables, tokenizer=tokenizer, step=step)
