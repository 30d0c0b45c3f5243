"""extend-context: V3's two-stage YaRN context extension, from a pretrain-tiny checkpoint.

    python -m experiments pretrain-tiny --run-dir runs/pretrain-tiny      # first
    python -m experiments extend-context --run-dir runs/extend-context

Like V3 (4K -> 32K -> 128K with one YaRN setting, factor 40, in both stages), the base model
trained on 256-token rows gets YaRN with factor 16 over an original length of 256 and is
trained for a short stage on 1024-token rows, then on 4096-token rows, at a constant learning
rate of peak/30 (V3: 7.3e-6). Held-out CE is reported at 256, 1024 and 4096 tokens for the
base model, the base model with YaRN switched on untrained, and after each stage.
Runtime: ~15 minutes on 2 CPU cores (stage 2's 4096-token rows dominate). Measured
2026-11-29 from the 800-step pretrain-tiny (held-out CE at 256 / 1024 / 4096 tokens):
  base            3.067 / 3.200 / 3.406   (degrades past its 256-token training length)
  base + YaRN     3.187 / 3.331 / 3.549   (YaRN alone, untrained, costs ~0.12 everywhere)
  after stage 1   3.094 / 3.182 / 3.355
  after stage 2   3.092 / 3.167 / 3.328   (long-context CE down 0.08 from base, 256 kept)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments import pretrain_tiny
from model import YarnConfig
from train.loop import LoopConfig
from train.optimizer import LRSchedule, OptimizerConfig
from train.pretrain import PretrainConfig, evaluate_run, pretrain


@dataclasses.dataclass(frozen=True)
class ExtendConfig:
    base_run: str = "runs/pretrain-tiny"
    factor: float = 16.0  # final length / original length, used in both stages (as V3)
    stage1_len: int = 1024
    stage2_len: int = 4096
    stage1_steps: int = 60
    stage2_steps: int = 40
    tokens_per_step: int = 4096
    lr: float = 1e-4  # constant, pretrain-tiny's peak / 30 (V3: 7.3e-6 = 2.2e-4 / 30)
    eval_batches: int = 4
    eval_tokens_per_batch: int = 4096

    def __post_init__(self):
        for name in ("stage1_len", "stage2_len", "stage1_steps", "stage2_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ExtendConfig.{name} must be > 0")
        if not self.factor >= 1:
            raise ValueError(f"ExtendConfig.factor must be >= 1, got {self.factor}")


def get_config() -> ExtendConfig:
    return ExtendConfig()


def _base() -> PretrainConfig:
    return pretrain_tiny.get_config()


def _stage(config: ExtendConfig, base: PretrainConfig, seq_len: int, steps: int, init_from: str):
    original = base.data.seq_len
    mla = dataclasses.replace(
        base.model.mla, yarn=YarnConfig(factor=config.factor, original_max_position=original)
    )
    model = base.model.replace(mla=mla, max_seq_len=int(original * config.factor))
    data = dataclasses.replace(
        base.data, seq_len=seq_len, batch_size=max(config.tokens_per_step // seq_len, 1)
    )
    schedule = LRSchedule(peak_lr=config.lr, warmup_steps=0, final_lr=config.lr)
    return dataclasses.replace(
        base,
        model=model,
        data=data,
        optimizer=OptimizerConfig(schedule=schedule),
        loop=LoopConfig(
            steps=steps,
            eval_every=steps,
            eval_batches=config.eval_batches,
            checkpoint_every=steps,
            keep_checkpoints=1,
        ),
        init_from=init_from,
    )


def _evaluate(config: ExtendConfig, run_dir: Path, stage: PretrainConfig) -> dict[str, float]:
    out = {}
    original = stage.model.mla.yarn.original_max_position if stage.model.mla.yarn else 256
    for length in sorted({original, config.stage1_len, config.stage2_len}):
        batch = max(config.eval_tokens_per_batch // length, 1)
        cfg = dataclasses.replace(stage, data=dataclasses.replace(stage.data, batch_size=batch))
        losses = evaluate_run(run_dir, cfg, seq_len=length, batches=config.eval_batches)
        out[f"ce@{length}"] = round(losses["ce"], 4)
    return out


def run(config: ExtendConfig, run_dir) -> dict:
    run_dir, base_dir = Path(run_dir), Path(config.base_run)
    if not (base_dir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{base_dir}/checkpoints not found: run `python -m experiments pretrain-tiny "
            f"--run-dir {base_dir}` first (or --set base_run=...)"
        )
    base = _base()
    stage1 = _stage(config, base, config.stage1_len, config.stage1_steps, str(base_dir))
    no_yarn = dataclasses.replace(stage1, model=base.model.replace(max_seq_len=config.stage2_len))
    table = {
        "base": _evaluate(config, base_dir, no_yarn),
        "base + YaRN": _evaluate(config, base_dir, stage1),
    }
    pretrain(stage1, run_dir / "stage1")
    table["after stage 1"] = _evaluate(config, run_dir / "stage1", stage1)
    stage2 = _stage(config, base, config.stage2_len, config.stage2_steps, str(run_dir / "stage1"))
    pretrain(stage2, run_dir / "stage2")
    table["after stage 2"] = _evaluate(config, run_dir / "stage2", stage2)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "context_extension.json").write_text(json.dumps(table, indent=2) + "\n")
    lengths = list(table["base"])
    print("\nheld-out CE".ljust(16) + "".join(k.rjust(12) for k in lengths))
    for name, row in table.items():
        print(name.ljust(16) + "".join(f"{row[k]:12.4f}" for k in lengths))
    return {f"{name} {k}": v for name, row in table.items() for k, v in row.items()}
