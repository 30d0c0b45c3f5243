"""r1-zero: pure RL from a base model (DeepSeek-R1-Zero's recipe, in minutes on a CPU).

    python -m experiments r1-zero --run-dir runs/r1-zero

Stage 1 pre-trains a tiny V3 base (v3-tiny) on templated arithmetic: each problem appears in
the R1-Zero template and is answered in one of three styles, as text a base model could have
met in pre-training: a worked solution inside <think> </think> then <answer> </answer> (the
format the reward wants), a bare <answer> (no reasoning: fails the format), or a plain
sentence. The base can therefore reason but, greedily, does not: the bare answer is its most
likely style. Held-out problems are never in the corpus (disjoint hash splits).

Stage 2 runs GRPO from that base with R1-Zero's rule-based rewards only (accuracy + format,
no reward model, no SFT), once per seed, and reports greedy held-out accuracy before and
after: `accuracy` (strict format and the right integer), `format`, and `answer_correct` (the
last integer in the completion is right, format ignored: did RL make the model compute
better, not just format better?). Plots: runs' reward, held-out accuracy and completion length
over steps (run_dir/plots and each seed's run dir).

Runtime on 2 CPU cores: stage 1 ~16 min (900 steps; once, reused by later runs), stage 2
~5 min per seed (80 steps of 8 prompts x 8 samples). Measured 2026-11-29 (greedy, 200
held-out problems, 2-digit + and -; total 29.8 min):
    seed   accuracy        format          answer_correct
    0      0.000 -> 0.600  0.000 -> 1.000  0.045 -> 0.600
    1      0.000 -> 0.695  0.000 -> 1.000  0.045 -> 0.695
    2      0.000 -> 0.685  0.000 -> 1.000  0.045 -> 0.685
Completions grow from ~9 tokens (a bare answer) to ~55 (a worked solution) as the policy
learns to reason before answering.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from model import presets
from rl import tasks
from rl.grpo import GRPOConfig, constant_lr, train_grpo
from rl.grpo_loss import GRPOLossConfig
from rl.rewards import format_reward, integer_accuracy, last_integer_accuracy
from sharding.mesh import ParallelConfig
from train.arithmetic import Operation
from train.data import TOKENIZER_FILE, DataConfig
from train.loop import LoopConfig, check_finished
from train.optimizer import OptimizerConfig
from train.plots import compare_runs
from train.pretrain import PretrainConfig, pretrain, schedule_for
from train.run import load_run
from train.run_dir import to_json
from train.sources import ArithmeticSource, FilesSource, StdlibSource
from train.splits import Split
from train.tokenizer import train_bpe

log = logging.getLogger(__name__)

EVAL_FNS = {
    "accuracy": integer_accuracy,
    "format": format_reward,
    "answer_correct": last_integer_accuracy,
}


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Stage 1: the base model's corpus and pre-training."""

    model: str = "v3-tiny"  # a model.presets name
    documents: int = 100_000
    worked: float = 0.7  # fraction of documents that are plain worked solutions (no template)
    reasoned: float = 0.09  # ... in the template, answered with <think> ... <answer>
    answer_only: float = 0.15  # ... in the template, with a bare <answer>
    plain: float = 0.06  # ... in the template, with "The answer is N."
    vocab_size: int = 1024
    steps: int = 900
    batch_size: int = 16
    seq_len: int = 256
    peak_lr: float = 3e-3
    seed: int = 0

    def mix(self) -> dict[str, float]:
        return {
            tasks.REASONED: self.reasoned,
            tasks.ANSWER_ONLY: self.answer_only,
            tasks.PLAIN: self.plain,
            tasks.DOCUMENT: self.worked,
        }


@dataclasses.dataclass(frozen=True)
class R1ZeroConfig:
    base: BaseConfig = dataclasses.field(default_factory=BaseConfig)
    base_run: str | None = None  # an existing base run dir; None: stage 1 in run_dir/base
    max_digits: int = 2
    operations: str = "+-"
    train_tasks: int = 4000
    eval_tasks: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    # The mesh of both stages (--set parallel.fsdp=8 ...); it replaces grpo.parallel.
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    grpo: GRPOConfig = dataclasses.field(
        default_factory=lambda: GRPOConfig(
            loss=GRPOLossConfig(beta=0.001),
            optimizer=constant_lr(3e-4),
            steps=80,
            prompts_per_step=8,
            group_size=8,
            max_new_tokens=96,
            eval_every=20,
            checkpoint_every=40,
        )
    )

    def __post_init__(self):
        try:
            self.ops()
        except ValueError:
            raise ValueError(
                f"R1ZeroConfig.operations must be characters of '+-*', got {self.operations!r}"
            ) from None
        if not self.seeds:
            raise ValueError("R1ZeroConfig.seeds must name at least one seed")

    def ops(self) -> tuple[Operation, ...]:
        return tuple(Operation(c) for c in self.operations)


def get_config() -> R1ZeroConfig:
    return R1ZeroConfig()


def pretrain_base(
    config: R1ZeroConfig, run_dir: Path, documents: Callable[[], list[str]] | None = None
) -> Path:
    """Stage 1 in run_dir (resumes; a finished base is reused as is). `documents()` gives the
    corpus (default: the templated arithmetic of `tasks.base_corpus`)."""
    b = config.base
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus = run_dir / "corpus.jsonl"
    if not corpus.exists():
        if documents is None:
            docs = tasks.base_corpus(
                b.documents, b.seed, b.mix(), max_digits=config.max_digits,
                operations=config.ops(),
            )  # fmt: skip
        else:
            docs = documents()
        tmp = corpus.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
            encoding="utf-8",
        )
        tmp.replace(corpus)
        # Digits stay single tokens, as column arithmetic needs.
        train_bpe(docs[:20_000], b.vocab_size, split_digits=True).save(run_dir / TOKENIZER_FILE)
    summary = pretrain(
        PretrainConfig(
            model=presets.get(b.model),
            data=DataConfig(
                stdlib=StdlibSource(weight=0.0),
                arithmetic=ArithmeticSource(weight=0.0),
                files=FilesSource(path=str(corpus), weight=1.0),
                seq_len=b.seq_len,
                batch_size=b.batch_size,
                fim_rate=0.0,
                seed=b.seed,
            ),
            optimizer=OptimizerConfig(schedule=schedule_for(b.steps, b.peak_lr, warmup=30)),
            loop=LoopConfig(
                steps=b.steps,
                eval_every=b.steps,
                eval_batches=4,
                checkpoint_every=b.steps,
                keep_checkpoints=1,
            ),
            parallel=config.parallel,
            vocab_size=b.vocab_size,
            seed=b.seed,
        ),
        run_dir,
    )
    check_finished(summary["interrupted"], run_dir)
    return run_dir


def _table(rows: list[dict]) -> str:
    lines = [
        f"{'seed':>4}  {'accuracy before -> after':>26}  {'format':>15}  "
        f"{'answer_correct':>15}  {'minutes':>7}"
    ]
    for r in rows:
        cells = [f"{r['seed']:>4}"]
        for name, width in (("accuracy", 26), ("format", 15), ("answer_correct", 15)):
            before, after = r["before"][name], r["after"][name]
            cells.append(f"{before:.3f} -> {after:.3f}".rjust(width))
        cells.append(f"{r['wall_s'] / 60:>7.1f}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def run(config: R1ZeroConfig, run_dir) -> dict:
    run_dir = Path(run_dir)
    started = time.perf_counter()
    base_dir = Path(config.base_run) if config.base_run else pretrain_base(config, run_dir / "base")
    base_s = time.perf_counter() - started
    base = load_run(base_dir)
    ops = config.ops()
    eval_tasks = tasks.arithmetic_tasks(
        Split.HELDOUT, config.eval_tasks, 0, max_digits=config.max_digits, operations=ops
    )
    reward = {integer_accuracy: config.accuracy_weight, format_reward: config.format_weight}
    rows, seed_dirs = [], {}
    for seed in config.seeds:
        train_tasks = tasks.arithmetic_tasks(
            Split.TRAIN, config.train_tasks, 1000 + seed, max_digits=config.max_digits,
            operations=ops,
        )  # fmt: skip
        seed_dir = run_dir / f"seed{seed}"
        seed_dirs[f"seed {seed}"] = seed_dir
        result = train_grpo(
            seed_dir,
            cfg=base.cfg,
            tokenizer=base.tokenizer,
            variables=base.variables,
            reward=reward,
            train_tasks=train_tasks,
            eval_tasks=eval_tasks,
            eval_fns=EVAL_FNS,
            config=dataclasses.replace(config.grpo, seed=seed, parallel=config.parallel),
            meta={"r1_zero": to_json(config)},
        )
        check_finished(result.interrupted, seed_dir)  # never the next seed after a signal
        before, after = result.eval_before, result.eval
        rows.append({"seed": seed, "before": before, "after": after, "wall_s": result.wall_s})
    print(_table(rows))
    for key, name in (
        ("eval/accuracy", "accuracy.png"),
        ("reward_mean", "reward.png"),
        ("completion_len_mean", "completion_length.png"),
    ):
        compare_runs(seed_dirs, key, run_dir / "plots" / name)
    gains = [r["after"]["accuracy"] - r["before"]["accuracy"] for r in rows]
    summary = {
        "base_minutes": round(base_s / 60, 2),
        "grpo_minutes_per_seed": round(sum(r["wall_s"] for r in rows) / len(rows) / 60, 2),
        "min_accuracy_gain": round(min(gains), 4),
        **{f"seed{r['seed']}_accuracy_before": round(r["before"]["accuracy"], 4) for r in rows},
        **{f"seed{r['seed']}_accuracy_after": round(r["after"]["accuracy"], 4) for r in rows},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary | {"rows": rows}, indent=2) + "\n")
    return summary
