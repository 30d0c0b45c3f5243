"""reward-model: a scalar (Bradley-Terry) reward model and a generative judge on the embedded
preference pairs, from a tiny base, on a 2-core CPU.

    python -m experiments reward-model --run-dir runs/reward-model
    python -m experiments reward-model --run-dir runs/rm2 --set base_run=runs/sft/base

Stage 1 (skipped with base_run) pre-trains the r1-zero experiment's tiny arithmetic base.
Stage 2 trains a scalar reward model from it (rl/reward_trainer.py) on `pairs` generated
pairs (rl/preferences.py: a correct worked solution against an uncorrected slip, a truncated,
a format-broken or a rambling response), one epoch. Stage 3 fine-tunes the base into a judge
(train/sft.py) that critiques a response inside <think> and gives `Score: 0-2` (rl/judge.py),
on the same pairs' responses. Both are then scored on `eval_pairs` pairs of unseen questions
(the held-out split): the scalar model's pairwise accuracy, overall and per kind; the judge's
verdict accuracy (its score is the response's), pairwise accuracy (chosen scored above
rejected; a tie or no verdict counts as wrong) and parse rate.

Runtime and result, measured 2026-12-02 on 2 CPU cores with the defaults, from the `sft`
experiment's base (stage 1 skipped; both stages shared the machine with another job): scalar
RM 4.4 min (120 steps of 16 pairs), held-out pairwise accuracy 0.378 -> 0.911; on the 120
unseen pairs 0.85: format, truncated and rambling pairs 1.00, confident mistakes 0.40. Judge
14.5 min (503 steps, 2 epochs), held-out SFT loss 17.4 -> 0.0078; on the unseen pairs parse
rate 1.00, verdict accuracy 0.875, pairwise accuracy 0.75: 1.00 on format, truncated and
rambling, 0.00 on mistakes (it calls every confident wrong solution good). Neither tiny model
checks arithmetic: a mistake differs from its chosen solution only in the answer and its
check's numbers (rl/preferences.py), which is the point of that kind.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from experiments import r1_zero
from rl.judge import JUDGE_LAYOUT, JudgeReward, judge_accuracy, judge_conversations
from rl.preferences import preference_pairs
from rl.reward_data import PairDataConfig
from rl.reward_eval import load_reward_model, score_pairs
from rl.reward_trainer import RewardModelConfig, train_reward_model
from sharding.mesh import ParallelConfig
from train.loop import LoopConfig, check_finished
from train.run import load_run
from train.sft import SFTConfig, sft
from train.sft_data import SFTDataConfig
from train.splits import Split


@dataclasses.dataclass(frozen=True)
class RewardModelExperimentConfig:
    base: r1_zero.BaseConfig = dataclasses.field(
        default_factory=lambda: r1_zero.BaseConfig(steps=400)
    )
    base_run: str | None = None  # an existing base run dir; None: stage 1 in run_dir/base
    pairs: int = 2000  # training pairs (a twentieth held out by prompt during training)
    eval_pairs: int = 120  # pairs on unseen questions, for both models (of ~160 distinct)
    scalar: RewardModelConfig = dataclasses.field(
        default_factory=lambda: RewardModelConfig(
            data=PairDataConfig(seq_len=256, batch_pairs=16, heldout_fraction=0.05),
            peak_lr=3e-4,  # Llama 2's 1e-5 is for 7B-70B models; a tiny one needs more
            loop=LoopConfig(eval_every=50, checkpoint_every=100),
        )
    )
    judge: SFTConfig = dataclasses.field(
        default_factory=lambda: SFTConfig(
            data=SFTDataConfig(
                layout=JUDGE_LAYOUT, seq_len=512, batch_size=8, heldout_fraction=0.05
            ),
            peak_lr=1e-3,
            min_lr=1e-4,
            warmup_steps=10,
            epochs=2.0,
            loop=LoopConfig(eval_every=10_000, eval_batches=4, checkpoint_every=100),
        )
    )
    judge_max_new_tokens: int = 96  # a critique and its verdict: ~52 tokens here
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


def get_config() -> RewardModelExperimentConfig:
    return RewardModelExperimentConfig()


def run(config: RewardModelExperimentConfig, run_dir) -> dict:
    run_dir = Path(run_dir)
    clock = [time.perf_counter()]

    def lap() -> float:
        now = time.perf_counter()
        minutes = round((now - clock[0]) / 60, 2)
        clock[0] = now
        return minutes

    if config.base_run is None:
        base_config = r1_zero.R1ZeroConfig(base=config.base, parallel=config.parallel)
        base_dir = r1_zero.pretrain_base(base_config, run_dir / "base")
    else:
        base_dir = Path(config.base_run)
    base_minutes = lap()
    pairs = preference_pairs(Split.TRAIN, config.pairs, config.scalar.data.seed)
    unseen = preference_pairs(Split.HELDOUT, config.eval_pairs, config.scalar.data.seed)

    scalar_config = dataclasses.replace(
        config.scalar, init_from=str(base_dir), parallel=config.parallel
    )
    scalar = train_reward_model(scalar_config, run_dir / "scalar", pairs=pairs)
    check_finished(scalar["interrupted"], run_dir / "scalar")  # not the judge after a signal
    unseen_scalar = score_pairs(load_reward_model(run_dir / "scalar"), unseen)
    scalar_minutes = lap()

    base = load_run(base_dir)
    judge_data = judge_conversations(pairs, base.tokenizer, layout=config.scalar.data.layout)
    judge_config = dataclasses.replace(
        config.judge, init_from=str(base_dir), parallel=config.parallel
    )
    judged = sft(judge_config, run_dir / "judge", conversations=judge_data)
    trained = load_run(run_dir / "judge")
    judge = JudgeReward(
        trained.cfg, trained.variables, trained.tokenizer,
        layout=config.scalar.data.layout, max_new_tokens=config.judge_max_new_tokens,
    )  # fmt: skip
    unseen_judge = judge_accuracy(judge, unseen)
    judge_minutes = lap()

    out = {
        "base_minutes": base_minutes,
        "scalar_minutes": scalar_minutes,
        "judge_minutes": judge_minutes,
        "scalar_steps": scalar["steps"],
        "scalar_heldout_accuracy_before": scalar["heldout_accuracy_before"],
        "scalar_heldout_accuracy": scalar["heldout_accuracy"],
        **{f"scalar_unseen_{k}": v for k, v in unseen_scalar.items()},
        "judge_steps": judged["steps"],
        "judge_heldout_loss_before": judged["eval_loss_before"],
        "judge_heldout_loss": judged["eval_loss"],
        **{f"judge_unseen_{k}": v for k, v in unseen_judge.items()},
    }
    print(json.dumps(out, indent=2))
    (run_dir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
