"""Supervised fine-tuning as a function of one config, on the one training loop.

    base (a jaxseek run dir or a Hugging Face checkpoint) + conversations
      -> chat rendering, packing with sample masking (train/sft_data.py)
      -> prompt-masked CE normalised by the global count of trained tokens (train/step.py)
      -> train.lm_train.train: checkpoints, exact resume, metrics, held-out loss, plots

V3's SFT recipe is the default: 2 epochs, learning rate on a cosine from 5e-6 to 1e-6, packing
with sample masking. Tiny models need larger rates (the experiments set them). The run dir
gets the tokenizer with the chat template in Hugging Face's files (tokenizer_config.json), so
`AutoTokenizer.from_pretrained(run_dir)` renders the conversations the model was trained on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from model import ModelConfig, hf
from sharding.mesh import ParallelConfig, make_parallel
from train import sft_data
from train.chat import Conversation, save_for_transformers
from train.data import TOKENIZER_FILE
from train.kd import KDConfig, check_same_vocabulary, teacher_outputs
from train.kd_cache import with_teacher_topk
from train.lm_train import SAFE_FIELDS, train
from train.loop import LoopConfig
from train.metrics import read_metrics
from train.optimizer import LRSchedule, OptimizerConfig
from train.run import load_run
from train.run_dir import check_run_dir, to_json
from train.sft_data import SFTDataConfig
from train.splits import Split
from train.state import TrainState
from train.step import LossConfig
from train.tokenizer import Tokenizer

log = logging.getLogger(__name__)

OVERRIDE = "loop.allow_config_change=true (--set loop.allow_config_change=true)"


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """A fine-tuning run: the base, the data, V3's SFT schedule, the loop and the mesh."""

    init_from: str | None = None  # a jaxseek run dir: its model, tokenizer and latest weights
    hf_checkpoint: str | None = None  # or a Hugging Face dir: config.json, safetensors, tokenizer
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    loss: LossConfig = dataclasses.field(default_factory=lambda: LossConfig(mask_documents=True))
    epochs: float | None = 2.0  # V3: 2 epochs; they set the steps (None: loop.steps does)
    peak_lr: float = 5e-6  # V3 SFT: cosine decay 5e-6 -> 1e-6 over the run
    min_lr: float = 1e-6
    warmup_steps: int = 0
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loop: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(eval_every=50))
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    seed: int = 0
    # Logit-level distillation from a teacher with the same tokenizer (train/kd.py); None:
    # plain SFT (which is sequence-level distillation when the data are a teacher's samples).
    kd: KDConfig | None = None

    def __post_init__(self):
        if self.init_from is not None and self.hf_checkpoint is not None:
            raise ValueError("SFTConfig: set one of init_from (a run dir) and hf_checkpoint")
        if self.kd is not None and not isinstance(self.kd, KDConfig):
            raise ValueError(f"SFTConfig.kd must be a KDConfig or None, got {self.kd!r}")
        if not self.loss.mask_documents:
            raise ValueError("SFTConfig.loss.mask_documents must be True (SFT masks samples)")
        if self.optimizer.schedule != LRSchedule():
            raise ValueError(
                "SFTConfig.optimizer.schedule is built from peak_lr, min_lr, warmup_steps and the "
                "run's length; set those instead"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"SFTConfig.epochs = {self.epochs!r}: must be > 0 or None")
        if not 0 <= self.min_lr <= self.peak_lr or not self.peak_lr > 0:
            raise ValueError(
                f"SFTConfig: need 0 <= min_lr <= peak_lr and peak_lr > 0, got min_lr "
                f"{self.min_lr!r}, peak_lr {self.peak_lr!r}"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"SFTConfig.warmup_steps = {self.warmup_steps!r}: must be an int >= 0")


def load_base(
    init_from: str | None, hf_checkpoint: str | None, *, what: str = "SFTConfig"
) -> tuple[ModelConfig, dict, Tokenizer]:
    """(model config, variables, tokenizer) of a jaxseek run dir or a Hugging Face checkpoint
    (exactly one is given; `what` names the config in the error)."""
    if init_from is None and hf_checkpoint is None:
        raise ValueError(f"{what} needs a base: set init_from (a run dir) or hf_checkpoint")
    if init_from is not None and hf_checkpoint is not None:
        raise ValueError(f"{what}: set one of init_from (a run dir) and hf_checkpoint")
    if init_from is not None:
        run = load_run(init_from)
        return run.cfg, run.variables, run.tokenizer
    path = Path(hf_checkpoint)
    tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
    cfg, variables = hf.load(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size "
            f"is {cfg.vocab_size}"
        )
    return cfg, variables, tokenizer


def schedule(config: SFTConfig, steps: int) -> LRSchedule:
    """Warmup, then a cosine from peak_lr to min_lr over the rest of the run."""
    decay = max(steps - config.warmup_steps, 1)
    return LRSchedule(
        peak_lr=config.peak_lr,
        warmup_steps=config.warmup_steps,
        decay_steps=decay,
        min_lr=config.min_lr,
        final_lr=config.min_lr,
    )


def _eval_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "eval/loss" in r]


def sft(
    config: SFTConfig,
    run_dir: str | Path,
    *,
    conversations: Sequence[Conversation] | None = None,
    evaluate_more: Callable[[ModelConfig, dict, Tokenizer], dict] | None = None,
) -> dict[str, Any]:
    """Fine-tune (or resume) in run_dir on config.data.path or `conversations`; returns the
    summary (also written to summary.json). `evaluate_more(cfg, variables, tokenizer)` adds
    held-out metrics at each evaluation, e.g. rl.evaluate's greedy task scores."""
    run_dir = Path(run_dir)
    cfg, base, tokenizer = load_base(config.init_from, config.hf_checkpoint)
    # The model's config travels with the run (train.run.load_run reads it from config.json).
    run_config = {**to_json(config), "model": to_json(cfg)}
    check_run_dir(  # before anything is written
        run_dir,
        run_config,
        safe=SAFE_FIELDS,
        allow_change=config.loop.allow_config_change,
        override=OVERRIDE,
    )
    if config.data.seq_len > cfg.max_seq_len:
        raise ValueError(
            f"SFTConfig: data.seq_len {config.data.seq_len} exceeds the base model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    data = sft_data.prepare(config.data, tokenizer, conversations)
    hosts = jax.process_count()
    rows = sft_data.rows_per_epoch(config.data, data)
    steps = config.loop.steps
    if config.epochs is not None:
        steps = max(math.ceil(config.epochs * rows / (config.data.batch_size * hosts)), 1)
    log.info("SFT: %d conversations, %d rows per epoch, %d steps; %s", len(data.train), rows,
             steps, data.stats)  # fmt: skip
    teacher = None
    if config.kd is not None:
        kd = config.kd
        step = None
        if kd.teacher_run is not None:
            found = load_run(kd.teacher_run)
            t_cfg, t_vars, t_tok, step = found.cfg, found.variables, found.tokenizer, found.step
        else:
            t_cfg, t_vars, t_tok = load_base(None, kd.teacher_hf, what="KDConfig")
        check_same_vocabulary(t_cfg, t_tok, cfg, tokenizer)
        if kd.precompute:
            source = str(Path(kd.teacher_run or kd.teacher_hf).resolve())
            data = with_teacher_topk(data, t_cfg, t_vars, kd.top_k, run_dir, source=source,
                                     step=step)  # fmt: skip
            del t_vars  # the run reads the teacher's top-k from disk
        else:
            teacher = teacher_outputs(t_cfg, t_vars, kd, config.loss.mask_documents)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / TOKENIZER_FILE).exists():
        save_for_transformers(tokenizer, run_dir, config.data.layout)

    def initial_state(fresh: TrainState) -> TrainState:
        return fresh.replace(params=base["params"], router_bias=base.get("router_bias", {}))

    shard = {"shard_index": jax.process_index(), "shard_count": hosts}

    def batches(split: Split):
        return sft_data.make_iterator(config.data, data, tokenizer, split, **shard)

    more = None
    if evaluate_more is not None:
        more = lambda model_cfg, variables: evaluate_more(model_cfg, variables, tokenizer)
    loop_cfg = dataclasses.replace(config.loop, steps=steps)
    result = train(
        run_dir,
        model_cfg=cfg,
        loss_cfg=config.loss,
        opt_cfg=dataclasses.replace(config.optimizer, schedule=schedule(config, steps)),
        loop_cfg=loop_cfg,
        train_iter=batches(Split.TRAIN),
        eval_batches=lambda: itertools.islice(batches(Split.HELDOUT), loop_cfg.eval_batches),
        seq_len=config.data.seq_len,
        seed=config.seed,
        meta={"config": run_config, "data": data.stats},
        initial_state=initial_state,
        parallel=make_parallel(config.parallel),
        config=run_config,
        evaluate_first=True,
        evaluate_more=more,
        kd=config.kd,
        teacher=teacher,
    )
    evals = _eval_records(run_dir)
    summary = {
        "steps": result.step,
        "epochs": round(result.step * config.data.batch_size * hosts / rows, 3),
        "interrupted": result.interrupted,
        "train_loss": float(result.train.get("loss", float("nan"))),
        "eval_loss_before": evals[0]["eval/loss"] if evals and evals[0]["step"] == 0 else None,
        **{f"eval_{k}": v for k, v in result.eval.items()},
        "tokens_per_s": round(result.tokens_per_s, 1),
        "mfu": result.mfu,
        "rows_per_epoch": rows,
        **data.stats,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
