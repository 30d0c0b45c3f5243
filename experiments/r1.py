"""r1: DeepSeek-R1's four-stage pipeline at tiny scale, with an R1-Zero run from the same base.

    python -m experiments r1 --run-dir runs/r1

The world (rl/world.py): arithmetic and countdown asked in English or Chinese (reasoning
expected in the prompt's language), small code problems checked in the sandbox, general
prompts ("list three ...", polite rewrites, greetings) and harmful requests; held-out prompts
by hash, in no stage's data.

    base     a tiny V3 pre-trained on the world's corpus: templated arithmetic in both
             languages, a share of worked solutions switching language midway, and general
             prompts answered well or badly at even odds (experiments/stages.py)
    RMs      scalar reward models from the base: helpfulness (on the summary) and
             harmlessness (on the whole response), on general-prompt pairs
    stage 1  cold start: SFT of the base on cold-start chains of thought in R1's readable
             layout (rl/cold_start.py), in both languages
    stage 2  reasoning RL: GRPO from stage 1, rewards accuracy + format + language
             consistency (R1 adds the language reward to accuracy); one seed also without the
             language reward, to measure its trade-off
    stage 3  rejection sampling from stage 2 (seed 0): correct samples that pass R1's filters,
             plus non-reasoning data (general prompts answered without a chain of thought),
             fine-tuned from the **base**, as R1 retrained V3-Base on its 800k samples
             (`stage3_init="stage1"` fine-tunes the cold-start model instead); 3 epochs
             where R1 ran 2, as a tiny world's samples are few
    stage 4  all-scenario RL: GRPO from stage 3 on reasoning prompts (rule rewards) and
             general prompts (the reward models), per seed
    r1-zero  GRPO from the base in R1-Zero's template, accuracy + format only, per seed

Every stage has its own run dir under run_dir, resumes, and is reused by a rerun once
finished. The experiment ends with a Markdown table (run_dir/table.md) of held-out scores
after every stage: accuracy per task and language, format rate, language consistency, both
reward models' mean scores, the win rate against stage 1's answers (by the prompt's reward
model), the general rule check (never trained on: whether reward-model gains are real),
response lengths and minutes; countdown gets its own table. Plots of the RL runs' rewards,
held-out accuracy and response length go to run_dir/plots.

What the papers lead one to expect: cold start gives readable, well-formatted output from the
first RL step and faster gains than R1-Zero; the language reward lifts consistency at a small
accuracy cost (R1 reports the trade-off); stage 3 keeps the reasoning and gains on general
prompts; stage 4 raises general-prompt scores without losing reasoning. Countdown is where
small models fail at R1-Zero-style RL (TinyZero: a 0.5B model did not learn the search, 1.5B+
did), so its accuracy and response length are reported on their own.

Measured 2026-12-02 on 2 CPU cores with the defaults: 62 minutes (README, "The R1 pipeline on
a CPU", has the table). Held: the cold start's readable format and accuracy before any RL
(format 0 -> 0.82, arithmetic 0.79 / 0.56 en / zh), kept through reasoning RL (format 0.99);
R1-Zero's language mixing (consistency 0.70-0.89 against 0.99-1.00 after a cold start);
stage 4 raising the reward models' scores with the rule check held (0.31-0.33). Not seen: the
language reward's trade-off (consistency was already 1.00), English reasoning kept through
stage 3's retraining from the base (0.11; Chinese 0.69), any countdown learning.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments import stages
from rl import cold_start, world, world_rewards
from rl.grpo import GRPOConfig, constant_lr
from rl.grpo_loss import GRPOLossConfig
from rl.rejection_sampling import RejectionConfig
from rl.world_eval import summarize
from sharding.mesh import ParallelConfig
from train.chat import Layout
from train.loop import LoopConfig
from train.plots import compare_runs
from train.run import load_run
from train.run_dir import to_json
from train.sft import SFTConfig
from train.sft_data import SFTDataConfig
from train.splits import Split


def default_sft(epochs: float = 2.0) -> SFTConfig:
    return SFTConfig(
        data=SFTDataConfig(
            layout=Layout.READABLE, seq_len=512, batch_size=8, heldout_fraction=0.05
        ),
        epochs=epochs,
        peak_lr=1e-3,  # V3's 5e-6 -> 1e-6 is for a 671B model; a tiny one needs more
        min_lr=1e-4,
        warmup_steps=10,
        loop=LoopConfig(eval_every=10_000, eval_batches=4, checkpoint_every=100),
    )


def default_grpo(lr: float = 5e-5, temperature: float = 0.7) -> GRPOConfig:
    """GRPO for a cold-started policy. The first measured run used lr 2e-4 and temperature 1:
    the KL to the reference reached 0.7 and held-out accuracy fell from 0.74-0.78 to
    0.26-0.61, while rollouts at temperature 1 were 0-14% correct against 74% greedy, so
    format was the only reward the groups could tell apart. R1's second RL stage samples at
    0.7 for the same reason (higher temperatures made its output incoherent)."""
    return GRPOConfig(
        loss=GRPOLossConfig(beta=0.001),
        optimizer=constant_lr(lr),
        temperature=temperature,
        steps=30,
        prompts_per_step=8,
        group_size=8,
        max_new_tokens=192,  # the cold start's arithmetic runs to ~140 tokens
        eval_every=15,
        checkpoint_every=15,
    )


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """The tasks every stage draws from."""

    chinese_fraction: float = 0.5  # of arithmetic and countdown prompts
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: dict(world.DEFAULT_MIX))
    train_tasks: int = 2000  # reasoning prompts for RL and rejection sampling (TRAIN split)
    general_tasks: int = 400  # general prompts for stage 3 data and stage 4 (TRAIN split)
    eval_reasoning: int = 110  # held-out reasoning prompts for the table (22 code: all there are)
    eval_general: int = 48  # held-out general prompts for the table
    grpo_eval: int = 48  # held-out reasoning prompts evaluated during RL (the plots)
    eval_max_new_tokens: int = 192


@dataclasses.dataclass(frozen=True)
class R1Config:
    base: stages.WorldBaseConfig = dataclasses.field(default_factory=stages.WorldBaseConfig)
    base_run: str | None = None  # an existing base run dir; None: pre-train in run_dir/base
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    reward_models: stages.RewardModelsConfig = dataclasses.field(
        default_factory=stages.RewardModelsConfig
    )
    seeds: tuple[int, ...] = (0, 1)  # of every RL stage
    cold_start_samples: int = 3000
    cold_start_code_fraction: float = 0.035  # 105 of the 109 distinct TRAIN code problems
    stage1: SFTConfig = dataclasses.field(default_factory=default_sft)
    stage2: GRPOConfig = dataclasses.field(default_factory=default_grpo)
    stage2_rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    )
    language_ablation: bool = True  # stage 2 without the language reward (first seed)
    rejection_prompts: int = 1000
    rejection: RejectionConfig = dataclasses.field(
        default_factory=lambda: RejectionConfig(
            samples_per_prompt=4,
            keep_per_prompt=2,
            max_new_tokens=192,
            require={"accuracy": 1.0, "format": 1.0},
        )
    )
    stage3_general: int = 600  # non-reasoning conversations mixed into stage 3
    stage3_init: str = "base"  # "base" (R1) or "stage1"
    # 3 epochs, where R1 ran 2 over 800k samples: ~2000 samples are fewer tokens than the cold
    # start's 2 epochs, and the first run's 29 SFT steps from the base did not learn the layout.
    stage3: SFTConfig = dataclasses.field(default_factory=lambda: default_sft(epochs=3.0))
    stage4: GRPOConfig = dataclasses.field(default_factory=default_grpo)
    stage4_general_share: float = 0.5  # of stage 4's prompts
    stage4_rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(
            ("accuracy", "format", "language", "helpful", "harmless"), 1.0
        )
    )
    # From the base R1-Zero has the format to learn (rollouts start at 0% format): R1-Zero's
    # temperature 1 and a larger step, which learned it within 30 steps in the first run.
    r1_zero: GRPOConfig = dataclasses.field(
        default_factory=lambda: default_grpo(lr=2e-4, temperature=1.0)
    )
    r1_zero_rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 1.0}
    )
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("R1Config.seeds must name at least one seed")
        if self.stage3_init not in ("base", "stage1"):
            raise ValueError(
                f"R1Config.stage3_init must be 'base' or 'stage1', got {self.stage3_init!r}"
            )
        if not 0 <= self.stage4_general_share < 1:
            raise ValueError("R1Config.stage4_general_share must be in [0, 1)")
        for name in ("stage2_rewards", "stage4_rewards", "r1_zero_rewards"):
            unknown = set(getattr(self, name)) - {*world_rewards.RULES, "helpful", "harmless"}
            if unknown:
                raise ValueError(f"R1Config.{name} names unknown rewards {sorted(unknown)}")


def get_config() -> R1Config:
    return R1Config()


def run(config: R1Config, run_dir) -> dict:
    run_dir = Path(run_dir)
    timed = stages.Timings(run_dir / "timings.json")
    w, parallel, meta = config.world, config.parallel, {"r1": to_json(config)}
    with timed("base"):
        base_dir = (
            Path(config.base_run)
            if config.base_run
            else stages.base_stage(config.base, parallel, run_dir / "base")
        )
    base = load_run(base_dir)
    tok = base.tokenizer
    with timed("reward models"):
        rms, rm_summaries = stages.reward_models(config.reward_models, base_dir, parallel, run_dir)
    rm_fns = world_rewards.model_rewards(rms["helpful"], rms["harmless"])
    rewards = world_rewards.RULES | rm_fns

    def reasoning(split, count, seed):
        return world.reasoning_tasks(
            split, count, seed, mix=w.mix, chinese_fraction=w.chinese_fraction
        )

    heldout = reasoning(Split.HELDOUT, w.eval_reasoning, 0)
    heldout += world.general_tasks(Split.HELDOUT, w.eval_general, 0)
    chat_eval, zero_eval = world.as_chat(heldout, tok), world.as_r1_zero(heldout)
    grpo_eval = reasoning(Split.HELDOUT, w.grpo_eval, 1)
    train_reasoning = reasoning(Split.TRAIN, w.train_tasks, 1000)
    records: dict[str, list] = {}

    def evaluate(name: str, run, where: Path, tasks_: list) -> None:
        records[name] = stages.evaluate_stage(
            run, where, tasks_, rm_fns, max_new_tokens=w.eval_max_new_tokens
        )

    with timed("evaluate base"):
        evaluate("base", base, run_dir / "base_eval", zero_eval)

    with timed("stage 1"):
        conversations = cold_start.cold_start(
            Split.TRAIN, config.cold_start_samples, config.stage1.seed,
            code_fraction=config.cold_start_code_fraction,
            chinese_fraction=w.chinese_fraction,
        )  # fmt: skip
        stages.sft_stage(config.stage1, base_dir, conversations, parallel, run_dir / "stage1")
        stage1 = load_run(run_dir / "stage1")
        evaluate("stage 1", stage1, run_dir / "stage1", chat_eval)

    rl_dirs: dict[str, Path] = {}

    chat = (world.as_chat(grpo_eval, tok), chat_eval)  # (during RL, for the table)
    zero = (world.as_r1_zero(grpo_eval), zero_eval)

    def rl(name: str, cfg_: GRPOConfig, start, tasks_, weights, evals, seed, where) -> None:
        with timed(name):
            reward = world_rewards.weighted(rewards, weights)
            stages.grpo_stage(
                cfg_, start, tasks_, reward, evals[0], seed=seed, parallel=parallel,
                run_dir=where, meta=meta,
            )  # fmt: skip
            evaluate(name, stages.policy(where, tok), where, evals[1])
        rl_dirs[name] = where

    chat_train = world.as_chat(train_reasoning, tok)
    for seed in config.seeds:
        rl(f"stage 2 seed {seed}", config.stage2, stage1, chat_train, config.stage2_rewards,
           chat, seed, run_dir / f"stage2_seed{seed}")  # fmt: skip
    if config.language_ablation:
        seed = config.seeds[0]
        no_language = {k: v for k, v in config.stage2_rewards.items() if k != "language"}
        rl(f"stage 2 no-lang seed {seed}", config.stage2, stage1, chat_train, no_language,
           chat, seed, run_dir / f"stage2_nolang_seed{seed}")  # fmt: skip

    with timed("stage 3"):
        source_dir = run_dir / f"stage2_seed{config.seeds[0]}"
        source = stages.policy(source_dir, tok)
        prompts = world.as_chat(reasoning(Split.TRAIN, config.rejection_prompts, 3000), tok)
        kept, rs_stats = stages.sample_stage(
            config.rejection, source, source_dir, prompts, run_dir / "stage3_samples"
        )
        data = kept + stages.general_conversations(config.stage3_general, config.stage3.seed)
        init = base_dir if config.stage3_init == "base" else run_dir / "stage1"
        stages.sft_stage(config.stage3, init, data, parallel, run_dir / "stage3")
        stage3 = load_run(run_dir / "stage3")
        evaluate("stage 3", stage3, run_dir / "stage3", chat_eval)

    n_general = round(w.train_tasks * config.stage4_general_share)
    mixed = world.as_chat(
        train_reasoning[: w.train_tasks - n_general]
        + world.general_tasks(Split.TRAIN, max(n_general, 1), 5000)[:n_general],
        tok,
    )
    for seed in config.seeds:
        rl(f"stage 4 seed {seed}", config.stage4, stage3, mixed, config.stage4_rewards,
           chat, seed, run_dir / f"stage4_seed{seed}")  # fmt: skip
    zero_train = world.as_r1_zero(train_reasoning)
    for seed in config.seeds:
        rl(f"r1-zero seed {seed}", config.r1_zero, base, zero_train, config.r1_zero_rewards,
           zero, seed, run_dir / f"r1zero_seed{seed}")  # fmt: skip
    return _report(config, run_dir, records, timed.minutes, rl_dirs, rs_stats, rm_summaries)


def _report(config, run_dir, records, minutes, rl_dirs, rs_stats, rm_summaries) -> dict:
    baseline = records["stage 1"]
    rows = {}
    for name, recs in records.items():
        rows[name] = summarize(recs, baseline=baseline) | {"minutes": minutes.get(name)}
    text = "\n\n".join([
        "Held-out scores after each stage (greedy):",
        stages.table(rows),
        "Countdown:",
        stages.table(stages.countdown_rows(records), stages.COUNTDOWN_COLUMNS),
    ])  # fmt: skip
    print(text)
    (run_dir / "table.md").write_text(text + "\n", encoding="utf-8")
    for key, name in (
        ("eval/accuracy", "accuracy.png"),
        ("eval/language", "language.png"),
        ("reward_mean", "reward.png"),
        ("completion_len_mean", "completion_length.png"),
    ):
        compare_runs(rl_dirs, key, run_dir / "plots" / name)
    summary = {
        "minutes": minutes,
        "rows": rows,
        "rejection_sampling": rs_stats,
        "reward_models": {k: v.get("heldout_accuracy") for k, v in rm_summaries.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {
        "total_minutes": round(sum(minutes.values()), 2),
        **{f"{stage} {k}": v for stage, row in rows.items() for k, v in row.items()
           if k in ("arithmetic_en", "countdown_en", "language", "win_rate")},
    }  # fmt: skip
