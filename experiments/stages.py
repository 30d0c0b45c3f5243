"""The stages the post-training experiments (r1, v3-post-training) compose, each in its own
run dir, each resuming and reused by a rerun once finished:

    base_stage       a tiny V3 pre-trained on the two-language world corpus (rl/world.py)
    reward_models    scalar reward models for helpfulness (summary) and harmlessness (whole)
    sft_stage        SFT from a run dir on given conversations (train/sft.py)
    grpo_stage       GRPO from a run dir's newest weights (rl/grpo.py)
    sample_stage     rejection sampling from a run dir (rl/rejection_sampling.py)
    evaluate_stage   the world's held-out scores of a run dir, cached in it (rl/world_eval.py)

`Timings` records each stage's minutes in run_dir/timings.json, summed over the calls that
did its work, so a rerun that reuses a stage reports the time it took when it ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import r1_zero
from rl import general, tasks, world, world_rewards
from rl.grpo import GRPOConfig, train_grpo
from rl.preferences import Scope
from rl.rejection_sampling import Policy, RejectionConfig, rejection_sample
from rl.reward_data import PairDataConfig
from rl.reward_eval import TrainedRewardModel, load_reward_model
from rl.reward_trainer import RewardModelConfig, train_reward_model
from rl.world_eval import evaluate_world, summarize
from sharding.mesh import ParallelConfig
from train.chat import Message
from train.loop import LoopConfig, check_finished
from train.run import Run, latest_weights, model_config
from train.run_dir import digest
from train.sft import SFTConfig, sft
from train.splits import Split
from train.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class WorldBaseConfig:
    """The base: r1-zero's tiny V3 and pre-training, on arithmetic asked in both languages
    (some worked solutions switching language midway) and general prompts answered well or
    badly at even odds."""

    # 400 steps left the base unable to add digits ("9 + 3 = 10"): the cold start then got
    # 0-11% and RL had nothing to amplify (measured 2026-12-02).
    base: r1_zero.BaseConfig = dataclasses.field(
        default_factory=lambda: r1_zero.BaseConfig(steps=800)
    )
    chinese_fraction: float = 0.5
    switch_rate: float = 0.3
    general_documents: int = 3000

    def documents(self) -> list[str]:
        b = self.base
        docs = tasks.base_corpus(
            b.documents, b.seed, b.mix(), max_digits=2, operations=world.ADD_SUB,
            chinese_fraction=self.chinese_fraction, switch_rate=self.switch_rate,
        )  # fmt: skip
        docs += world.general_documents(self.general_documents, b.seed)
        order = np.random.default_rng(b.seed).permutation(len(docs))
        return [docs[i] for i in order]


def base_stage(config: WorldBaseConfig, parallel: ParallelConfig, run_dir: Path) -> Path:
    r1z = r1_zero.R1ZeroConfig(base=config.base, parallel=parallel)
    return r1_zero.pretrain_base(r1z, run_dir, documents=config.documents)


# Every stage raises train.loop.Interrupted when a signal stopped it early, so an experiment
# never goes on to its next stage (or marks this one done) with an unfinished run.


@dataclasses.dataclass(frozen=True)
class RewardModelsConfig:
    """Two scalar reward models from the base on general-prompt pairs (rl/general.py)."""

    helpful_pairs: int = 600
    harmless_pairs: int = 300
    rm: RewardModelConfig = dataclasses.field(
        default_factory=lambda: RewardModelConfig(
            data=PairDataConfig(seq_len=128, batch_pairs=16, heldout_fraction=0.1),
            peak_lr=3e-4,  # as the reward-model experiment: a tiny model needs more than 1e-5
            loop=LoopConfig(eval_every=1000, checkpoint_every=1000),
        )
    )


def reward_models(
    config: RewardModelsConfig, base_dir: Path, parallel: ParallelConfig, run_dir: Path
) -> tuple[dict[str, TrainedRewardModel], dict[str, Any]]:
    """({helpful, harmless}: trained reward models, their summaries)."""
    out, summaries = {}, {}
    for aspect, count, scope in (
        (general.HELPFUL, config.helpful_pairs, Scope.SUMMARY),
        (general.HARMLESS, config.harmless_pairs, Scope.RESPONSE),
    ):
        rm_config = dataclasses.replace(
            config.rm, init_from=str(base_dir), parallel=parallel,
            data=dataclasses.replace(config.rm.data, scope=scope),
        )  # fmt: skip
        pairs = general.pairs(Split.TRAIN, count, config.rm.seed, aspect)
        summaries[aspect] = train_reward_model(rm_config, run_dir / f"rm_{aspect}", pairs=pairs)
        check_finished(summaries[aspect]["interrupted"], run_dir / f"rm_{aspect}")
        out[aspect] = load_reward_model(run_dir / f"rm_{aspect}")
    return out, summaries


def sft_stage(
    config: SFTConfig,
    init_from: Path,
    conversations: Sequence[Sequence[Message]],
    parallel: ParallelConfig,
    run_dir: Path,
) -> dict:
    sft_config = dataclasses.replace(config, init_from=str(init_from), parallel=parallel)
    summary = sft(sft_config, run_dir, conversations=conversations)
    check_finished(summary["interrupted"], run_dir)
    return summary


def policy(run_dir: Path, tokenizer: Tokenizer) -> Run:
    """The newest weights of a run dir (GRPO dirs keep no tokenizer: the base's is given)."""
    cfg = model_config(run_dir).replace(vocab_size=tokenizer.vocab_size)
    variables, step = latest_weights(run_dir, cfg)
    return Run(cfg=cfg, variables=variables, tokenizer=tokenizer, step=step)


def grpo_stage(
    config: GRPOConfig,
    start: Run,
    train_tasks: Sequence[Mapping[str, Any]],
    reward: Mapping[str, tuple],
    eval_tasks: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    parallel: ParallelConfig,
    run_dir: Path,
    meta: dict,
):
    result = train_grpo(
        run_dir,
        cfg=start.cfg,
        tokenizer=start.tokenizer,
        variables=start.variables,
        reward=reward,
        train_tasks=train_tasks,
        eval_tasks=eval_tasks,
        eval_fns=world_rewards.RULES,
        config=dataclasses.replace(config, seed=seed, parallel=parallel),
        meta=meta,
    )
    check_finished(result.interrupted, run_dir)
    return result


def sample_stage(
    config: RejectionConfig, source: Run, source_dir: Path, prompts: Sequence[dict], run_dir: Path
) -> tuple[list[list[Message]], dict]:
    """(kept conversations, stats) of rejection sampling from `source` on `prompts`."""
    who = Policy(source.cfg, source.variables, source.tokenizer, str(source_dir), source.step)
    fns = world_rewards.RULES
    stats = rejection_sample(config, run_dir, policy=who, tasks=prompts, reward_fns=fns)
    kept = []
    for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        kept.append([Message.from_dict(m) for m in json.loads(line)["messages"]])
    return kept, stats


def general_conversations(count: int, seed: int) -> list[list[Message]]:
    """Non-reasoning SFT data: TRAIN general prompts with their preferred answers."""
    rng = np.random.default_rng([seed, 4])
    return [general.conversation(p, rng) for p in general.prompts(Split.TRAIN, count, seed)]


EVAL_FILE = "world_eval.json"


def evaluate_stage(
    run: Run,
    run_dir: Path,
    heldout: Sequence[Mapping[str, Any]],
    model_fns: Mapping,
    *,
    max_new_tokens: int,
) -> list[dict]:
    """The held-out records of a run dir's policy, computed once per (tasks, step) and kept in
    run_dir/world_eval.json. `model_fns` is world_rewards.model_rewards(...), built once per
    experiment: each ScalarReward jits its own scorer, so a new one per stage would compile
    again."""
    key = digest({"tasks": list(heldout), "step": run.step, "max_new_tokens": max_new_tokens})
    path = run_dir / EVAL_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["records"]
    records = evaluate_world(
        run.cfg, run.variables, run.tokenizer, heldout, model_fns, max_new_tokens=max_new_tokens
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "records": records}, ensure_ascii=False), "utf-8")
    tmp.replace(path)
    return records


class Timings:
    """Minutes per stage in a JSON file: the calls that ran a stage until it first finished,
    interrupted ones included, summed; later calls that only reuse it add nothing."""

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.minutes: dict[str, float] = saved.get("minutes", {})
        self.done: list[str] = saved.get("done", [])

    @contextlib.contextmanager
    def __call__(self, stage: str):
        print(f"== {stage}", flush=True)
        started, finished = time.perf_counter(), False
        try:
            yield
            finished = True
        finally:
            if stage not in self.done:
                spent = (time.perf_counter() - started) / 60
                self.minutes[stage] = round(self.minutes.get(stage, 0.0) + spent, 2)
                self.done += [stage] if finished else []
                self.path.parent.mkdir(parents=True, exist_ok=True)
                saved = {"minutes": self.minutes, "done": self.done}
                self.path.write_text(json.dumps(saved, indent=2) + "\n")


COLUMNS = (
    ("arithmetic_en", "arith en"), ("arithmetic_zh", "arith zh"),
    ("countdown_en", "cd en"), ("countdown_zh", "cd zh"), ("code_en", "code"),
    ("format", "format"), ("language", "lang"), ("helpful", "helpful RM"),
    ("harmless", "harmless RM"), ("win_rate", "win"), ("general_rule", "rule"),
    ("len_reasoning", "len R"), ("len_general", "len G"), ("minutes", "min"),
)  # fmt: skip


def table(rows: Mapping[str, Mapping[str, float | None]], columns=COLUMNS) -> str:
    """A Markdown table: one row per stage, the given (key, header) columns."""
    lines = ["| stage | " + " | ".join(h for _, h in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for stage, row in rows.items():
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.0f}" if key.startswith("len")
                         else f"{value:.1f}" if key == "minutes" else f"{value:.2f}")  # fmt: skip
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def countdown_rows(records: Mapping[str, Sequence[Mapping]]) -> dict[str, dict]:
    """Per stage: held-out countdown accuracy per language and mean countdown response length."""
    out = {}
    for stage, recs in records.items():
        row = {k: v for k, v in summarize(recs).items() if k.startswith("countdown")}
        lengths = [r["completion_len"] for r in recs if r["kind"] == "countdown"]
        row["len_countdown"] = sum(lengths) / len(lengths) if lengths else None
        out[stage] = row
    return out


COUNTDOWN_COLUMNS = (
    ("countdown_en", "countdown en"), ("countdown_zh", "countdown zh"),
    ("len_countdown", "len countdown"),
)  # fmt: skip
