"""rejection-sampling: R1's stage 3 data step, from an sft or r1-zero run dir, on a 2-core CPU.

    python -m experiments rejection-sampling --run-dir runs/rs --set policy_run=runs/sft/sft
    python -m experiments rejection-sampling --run-dir runs/rs0 \\
        --set policy_run=runs/r1-zero/seed0 --set prompts=r1_zero

Samples `rejection.samples_per_prompt` completions of each of `tasks` unseen-by-the-policy
arithmetic questions (the train split, asked in the chat format for an SFT policy or in
R1-Zero's template for an r1-zero one), scores them with the rule rewards (accuracy, format,
language consistency) and optionally a scalar reward model (`reward_model_run`, recorded as
`reward_model`), keeps the correct ones that pass R1's filters (mixed-language chain of
thought, over-long paragraphs, code blocks) and are not duplicates, at most
`rejection.keep_per_prompt` per prompt, and writes run_dir/samples.jsonl (+ .parquet) with
each sample's provenance, run_dir/stats.json and summary.json. Rerun into the same run dir,
it continues where it stopped. An r1-zero policy dir has no tokenizer of its own: the one of
its sibling base/ dir is used.

Runtime and result, measured 2026-12-02 on 2 CPU cores (defaults: 200 prompts x 8 samples,
K = 2, max 160 new tokens) from the `sft` experiment's run (step 293, greedy accuracy 0.09):
1.05 min; 1600 drawn, 72 kept (4.5%) from 62 prompts; rejected: 1324 incorrect, 145
unfinished, 52 duplicates, 1 near duplicate, 6 over K; R1's three chain-of-thought filters
rejected none (arithmetic in one script, short paragraphs, no code: they are tested on
crafted samples). Accuracy rewards read only the answer: a kept sample can reach the right
answer through a wrong step (one here writes "7 - 3 = 0" on the way to 4); requiring a
reward model's score as well is one remedy (`--set reward_model_run=DIR --set
rejection.require=accuracy:1,reward_model:0`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from pathlib import Path

from rl import cold_start, tasks
from rl.model_rewards import ScalarReward
from rl.rejection_sampling import Policy, RejectionConfig, rejection_sample
from rl.reward_eval import load_reward_model
from rl.rewards import format_reward, integer_accuracy, language_consistency
from train.arithmetic import Operation
from train.data import TOKENIZER_FILE
from train.run import latest_weights, model_config
from train.splits import Split
from train.tokenizer import Tokenizer


class PromptFormat(enum.Enum):
    CHAT = "chat"  # a user turn + generation prompt (cold-start SFT policies)
    R1_ZERO = "r1_zero"  # R1-Zero's template (r1-zero policies)


@dataclasses.dataclass(frozen=True)
class RejectionSamplingExperimentConfig:
    policy_run: str | None = None  # the run dir to sample from (required)
    prompts: PromptFormat = PromptFormat.CHAT
    tasks: int = 200
    max_digits: int = 2
    task_seed: int = 7
    reward_model_run: str | None = None  # a reward-model run dir (its `scalar` dir)
    rejection: RejectionConfig = dataclasses.field(
        default_factory=lambda: RejectionConfig(max_new_tokens=160)
    )


def get_config() -> RejectionSamplingExperimentConfig:
    return RejectionSamplingExperimentConfig()


def load_policy(run_dir: str | Path) -> Policy:
    """The newest weights of a run dir, with its tokenizer (an r1-zero seed dir's: base/)."""
    run_dir = Path(run_dir)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file() and (run_dir.parent / "base" / TOKENIZER_FILE).is_file():
        tokenizer_path = run_dir.parent / "base" / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {run_dir} (or its sibling base/)")
    tokenizer = Tokenizer.load(tokenizer_path)
    cfg = model_config(run_dir).replace(vocab_size=tokenizer.vocab_size)
    variables, step = latest_weights(run_dir, cfg)
    return Policy(cfg, variables, tokenizer, checkpoint=str(run_dir), step=step)


def run(config: RejectionSamplingExperimentConfig, run_dir) -> dict:
    if config.policy_run is None:
        raise ValueError(
            "rejection-sampling needs --set policy_run=RUN_DIR (an sft or r1-zero run)"
        )
    started = time.perf_counter()
    policy = load_policy(config.policy_run)
    ops = (Operation.ADD, Operation.SUB)
    if config.prompts is PromptFormat.CHAT:
        prompts = cold_start.chat_tasks(Split.TRAIN, config.tasks, config.task_seed,
                                        policy.tokenizer, max_digits=config.max_digits)  # fmt: skip
    else:
        prompts = tasks.arithmetic_tasks(Split.TRAIN, config.tasks, config.task_seed,
                                         max_digits=config.max_digits, operations=ops)  # fmt: skip
    fns = {"accuracy": integer_accuracy, "format": format_reward, "language": language_consistency}
    if config.reward_model_run is not None:
        fns["reward_model"] = ScalarReward(load_reward_model(config.reward_model_run))
    stats = rejection_sample(
        config.rejection, run_dir, policy=policy, tasks=prompts, reward_fns=fns
    )
    out = {"minutes": round((time.perf_counter() - started) / 60, 2), "policy_step": policy.step}
    out |= {k: v for k, v in stats.items() if k != "rejected"}
    out |= {f"rejected_{k}": v for k, v in stats["rejected"].items()}
    print(json.dumps(out, indent=2))
    (Path(run_dir) / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
