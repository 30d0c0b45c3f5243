"""Pre-training as a function of one config: tokenizer, data, model, loop, summary.

The experiment files (pretrain-tiny, balance-ablation, extend-context) are configurations
of `pretrain`; a later stage can start from an earlier run's weights with `init_from`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax

import model
from model import ModelConfig
from sharding.mesh import ParallelConfig, make_parallel
from train.data import TOKENIZER_FILE, DataConfig, make_iterator, prepare_tokenizer
from train.lm_train import OVERRIDE, SAFE_FIELDS, evaluate, train
from train.loop import LoopConfig
from train.metrics import read_metrics
from train.optimizer import LRSchedule, OptimizerConfig
from train.run import latest_weights
from train.run_dir import check_run_dir, to_json
from train.splits import Split
from train.state import TrainState
from train.step import LossConfig, make_eval_step
from train.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything a pre-training run needs; `model.vocab_size` follows the tokenizer."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: model.presets.get("v3-tiny"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    vocab_size: int = 2048  # BPE vocabulary trained on a sample of the training corpus
    tokenizer_sample_bytes: int = 4 << 20
    init_from: str | None = None  # a run dir: start from its latest weights (and tokenizer)
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size < 300:
            raise ValueError(
                f"PretrainConfig.vocab_size = {self.vocab_size!r}: must be an int >= 300 "
                "(256 byte tokens plus the special tokens and some merges)"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"PretrainConfig: data.seq_len {self.data.seq_len} exceeds "
                f"model.max_seq_len {self.model.max_seq_len}"
            )
        if self.data.mask_documents != self.loss.mask_documents:
            raise ValueError(
                "PretrainConfig: data.mask_documents and loss.mask_documents must agree "
                f"(got {self.data.mask_documents} and {self.loss.mask_documents})"
            )


def pretrain(config: PretrainConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) in run_dir; returns a summary of scalars. A run dir made by a
    config that differs outside SAFE_FIELDS is refused before anything is written."""
    run_dir = Path(run_dir)
    source = Path(config.init_from or ".") / TOKENIZER_FILE
    if config.init_from is not None and not source.is_file():
        raise FileNotFoundError(f"init_from: {source} does not exist")
    check_run_dir(  # before the tokenizer is written; train() writes the config
        run_dir,
        to_json(config),
        safe=SAFE_FIELDS,
        allow_change=config.loop.allow_config_change,
        override=OVERRIDE,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.init_from is not None and not (run_dir / TOKENIZER_FILE).exists():
        shutil.copy(source, run_dir / TOKENIZER_FILE)
    tokenizer = prepare_tokenizer(
        config.data,
        run_dir,
        vocab_size=config.vocab_size,
        sample_bytes=config.tokenizer_sample_bytes,
    )
    cfg = config.model.replace(vocab_size=tokenizer.vocab_size)

    initial_state = None
    if config.init_from is not None:
        source, _ = latest_weights(config.init_from, cfg)

        def initial_state(fresh: TrainState) -> TrainState:
            return fresh.replace(params=source["params"], router_bias=source.get("router_bias", {}))

    # Each process reads its own documents and yields its own data.batch_size rows.
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}

    def eval_batches():
        return itertools.islice(
            make_iterator(config.data, tokenizer, Split.HELDOUT, **shard), config.loop.eval_batches
        )

    result = train(
        run_dir,
        model_cfg=cfg,
        loss_cfg=config.loss,
        opt_cfg=config.optimizer,
        loop_cfg=config.loop,
        train_iter=make_iterator(config.data, tokenizer, Split.TRAIN, **shard),
        eval_batches=eval_batches,
        seq_len=config.data.seq_len,
        seed=config.seed,
        meta={"config": to_json(config)},
        initial_state=initial_state,
        parallel=make_parallel(config.parallel),
        config=to_json(config),
    )
    maxvio = [r["maxvio_mean"] for r in read_metrics(run_dir) if "maxvio_mean" in r]
    tail = maxvio[-max(len(maxvio) // 10, 1) :]
    summary = {
        "steps": result.step,
        "maxvio_last10pct": float(sum(tail) / len(tail)) if tail else float("nan"),
        "interrupted": result.interrupted,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "mfu": result.mfu,
        "train_loss": float(result.train.get("loss", float("nan"))),
        "maxvio_mean": float(result.train.get("maxvio_mean", float("nan"))),
        **{f"eval_{k}": v for k, v in result.eval.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def schedule_for(steps: int, peak_lr: float, warmup: int) -> LRSchedule:
    """The V3 shape squeezed into `steps`: warmup, constant to 60%, cosine to 10% peak by 90%,
    then the 10% plateau and a final 1/30 of the peak (the report's 2.2e-4 -> 2.2e-5 -> 7.3e-6)."""
    constant = max(int(0.6 * steps) - warmup, 0)
    decay = int(0.3 * steps)
    plateau = max(steps - warmup - constant - decay - max(steps // 30, 1), 0)
    return LRSchedule(
        peak_lr=peak_lr,
        warmup_steps=warmup,
        constant_steps=constant,
        decay_steps=decay,
        min_lr=peak_lr / 10,
        min_steps=plateau,
        final_lr=peak_lr / 30,
    )


def evaluate_run(
    run_dir: str | Path, config: PretrainConfig, *, seq_len: int, batches: int
) -> dict[str, float]:
    """Held-out losses of run_dir's latest weights under `config.model`, at `seq_len`."""
    run_dir = Path(run_dir)
    tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
    cfg = config.model.replace(
        vocab_size=tokenizer.vocab_size, max_seq_len=max(config.model.max_seq_len, seq_len)
    )
    variables, _ = latest_weights(run_dir, cfg)
    data = dataclasses.replace(config.data, seq_len=seq_len)
    eval_step = jax.jit(make_eval_step(cfg, config.loss))
    batches_it = itertools.islice(make_iterator(data, tokenizer, Split.HELDOUT), batches)
    return evaluate(eval_step, variables, batches_it, config.loss.mtp_weight)
