"""Rejection sampling: a policy's samples, scored and filtered, into an SFT dataset on disk.

    tasks -> N samples per prompt (model.generate; R1's temperature 0.6, top-p 0.95)
      -> every reward function (rules and/or reward models, rl/model_rewards.py)
      -> keep the correct ones (a threshold per required reward)
      -> R1's filters on the chain of thought, exact and near duplicates (rl/sample_filters.py)
      -> at most K per prompt
      -> out_dir/samples.jsonl and samples.parquet: {"messages", "provenance"}; stats.json

Each kept sample carries its provenance: task index, checkpoint and step, sample index, every
reward and every filter's verdict. `train.sft` reads samples.jsonl as it is. Work goes in
chunks of prompts, each written as one file when done (out_dir/chunks/, atomically), and each
chunk's sampling key depends only on the seed and the chunk, so a run that is interrupted and
rerun continues after its last finished chunk with no sample lost or duplicated, and ends with
exactly what an uninterrupted run writes. A rerun with a different config or different inputs
is refused (train/run_dir.py).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

import model
from model import ModelConfig
from rl import rewards as rule_rewards
from rl.evaluate import check_tasks, decode_completions, prompt_ids, task_columns
from rl.rewards import RewardFn
from rl.sample_filters import FilterConfig, duplicate_of, reasoning_checks
from train.chat import Layout, Message, Role, last_user_text, parse_assistant
from train.run_dir import check_run_dir, digest, to_json, write_config
from train.tokenizer import Tokenizer

OVERRIDE = "a new out_dir (rejection sampling never mixes two configs in one dataset)"
_R1_ZERO_USER = re.compile(r"\nUser: (?P<question>.*)\nAssistant:\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    """How many samples to draw and keep, how to sample, what counts as correct."""

    samples_per_prompt: int = 8  # N
    keep_per_prompt: int = 2  # K
    temperature: float = 0.6  # R1's sampling for evaluation
    top_p: float = 0.95
    max_new_tokens: int = 256
    layout: Layout = Layout.READABLE  # how a completion splits into reasoning and answer
    require: dict[str, float] = dataclasses.field(default_factory=lambda: {"accuracy": 1.0})
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    chunk_prompts: int = 16
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("samples_per_prompt", "keep_per_prompt", "max_new_tokens", "chunk_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RejectionConfig.{name} must be a positive int, got {value!r}")
        if self.keep_per_prompt > self.samples_per_prompt:
            raise ValueError("RejectionConfig.keep_per_prompt must be <= samples_per_prompt")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError("RejectionConfig: temperature must be > 0 and top_p in (0, 1]")
        if not isinstance(self.layout, Layout):
            raise ValueError(f"RejectionConfig.layout = {self.layout!r}: one of {list(Layout)}")
        if not self.require:
            raise ValueError("RejectionConfig.require is empty: nothing would decide correctness")


def to_message(completion: str, tokenizer: Tokenizer, layout: Layout) -> Message | None:
    """A completion as an assistant turn: reasoning and answer from R1-Zero's tags or the chat
    layout, else all of it as the answer; None when it is blank."""
    parsed = rule_rewards.parse(completion)
    if parsed is not None and parsed[0].strip() and parsed[1].strip():
        return Message(Role.ASSISTANT, parsed[1].strip(), reasoning=parsed[0].strip())
    return parse_assistant(completion, tokenizer, layout)


def question_of(task: Mapping[str, Any], tokenizer: Tokenizer) -> str:
    """The user's question of a task: its `question` column, the user turn of a chat prompt,
    or the question inside R1-Zero's template."""
    if task.get("question"):
        return str(task["question"])
    prompt = last_user_text(task["prompt"], tokenizer)
    match = _R1_ZERO_USER.search(prompt)
    return (match["question"] if match else prompt).strip()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The model samples come from, and where it came from (recorded in provenance)."""

    cfg: ModelConfig
    variables: dict
    tokenizer: Tokenizer
    checkpoint: str
    step: int


def _judge_sample(
    config: RejectionConfig,
    tokenizer: Tokenizer,
    text: str,
    finished: bool,
    scores: dict[str, float | None],
    kept: list[str],
) -> tuple[str | None, dict[str, bool], Message | None]:
    """(reason to reject or None, filter verdicts, message) of one sample."""
    if not finished:
        return "unfinished", {}, None
    for name, threshold in config.require.items():
        if scores[name] is None or scores[name] < threshold:
            return "incorrect", {}, None
    message = to_message(text, tokenizer, config.layout)
    if message is None:
        return "empty", {}, None
    checks = reasoning_checks(config.filters, message.reasoning or message.content)
    failed = next((name for name, passed in checks.items() if not passed), None)
    if failed is not None:
        return failed, checks, None
    duplicate = duplicate_of(config.filters, text, kept)
    checks["unique"] = duplicate is None
    if duplicate is not None:
        return duplicate, checks, None
    if len(kept) >= config.keep_per_prompt:
        return "over_keep", checks, None
    return None, checks, message


def _chunk(
    config: RejectionConfig,
    policy: Policy,
    tasks: Sequence[Mapping[str, Any]],
    first: int,
    index: int,
    reward_fns: Mapping[str, RewardFn],
) -> dict:
    """The kept samples and the counts of one chunk of tasks (starting at task `first`)."""
    tok, N = policy.tokenizer, config.samples_per_prompt
    prompts = [prompt_ids(t, tok) for t in tasks]
    out = model.generate(
        policy.cfg, policy.variables, prompts, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, stop_tokens=[tok.eos_id],
        num_samples=N, rng=jax.random.fold_in(jax.random.key(config.seed), index),
    )  # fmt: skip
    completions = out.completions()
    finished = [bool(c) and c[-1] == tok.eos_id for c in completions]
    texts = decode_completions(tok, completions)
    prompt_texts = [t["prompt"] for t in tasks for _ in range(N)]
    columns = task_columns(tasks, N)
    scores = {name: fn(prompt_texts, texts, **columns) for name, fn in reward_fns.items()}
    counts: collections.Counter = collections.Counter()
    samples = []
    for i, task in enumerate(tasks):
        kept: list[str] = []
        for j in range(N):
            row = i * N + j
            mine = {name: values[row] for name, values in scores.items()}
            reason, checks, message = _judge_sample(config, tok, texts[row], finished[row], mine,
                                                    kept)  # fmt: skip
            counts[reason or "kept"] += 1
            if message is None:
                continue
            kept.append(texts[row])
            samples.append({
                "messages": [Message(Role.USER, question_of(task, tok)).to_dict(),
                             message.to_dict()],
                "provenance": {
                    "task": first + i, "checkpoint": policy.checkpoint, "step": policy.step,
                    "sample": j, "rewards": mine, "filters": checks,
                },
            })  # fmt: skip
    return {"samples": samples, "counts": dict(counts)}


def rejection_sample(
    config: RejectionConfig,
    out_dir: str | Path,
    *,
    policy: Policy,
    tasks: Sequence[Mapping[str, Any]],
    reward_fns: Mapping[str, RewardFn],
) -> dict[str, Any]:
    """Sample, score, filter and write the dataset (resuming a partial run in out_dir); returns
    the stats (also in stats.json): samples drawn, kept, the kept fraction, rejections per
    reason."""
    check_tasks(tasks, "rejection_sample tasks")
    missing = sorted(set(config.require) - set(reward_fns))
    if missing:
        raise ValueError(f"RejectionConfig.require names {missing}, not among {sorted(reward_fns)}")
    out_dir = Path(out_dir)
    run_config = {
        "rejection": {k: v for k, v in to_json(config).items() if k != "progress"},
        "policy": {"checkpoint": policy.checkpoint, "step": policy.step},
        "rewards": sorted(reward_fns),
        "tasks": {"count": len(tasks), "sha256": digest(list(tasks))},
    }
    check_run_dir(out_dir, run_config, safe=(), allow_change=False, override=OVERRIDE)
    chunks = out_dir / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    write_config(out_dir, run_config, [])
    C = config.chunk_prompts
    starts = range(0, len(tasks), C)
    bar = tqdm(total=len(tasks), desc="rejection sampling", unit="prompt",
               disable=not config.progress)  # fmt: skip
    try:
        for index, first in enumerate(starts):
            path = chunks / f"{index:06d}.json"
            if not path.exists():
                done = _chunk(config, policy, tasks[first : first + C], first, index, reward_fns)
                _atomic_write(path, json.dumps(done, ensure_ascii=False))
            bar.update(len(tasks[first : first + C]))
    finally:
        bar.close()
    return _merge(config, out_dir, len(starts))


def _merge(config: RejectionConfig, out_dir: Path, num_chunks: int) -> dict[str, Any]:
    """samples.jsonl / samples.parquet / stats.json from the finished chunks, in task order."""
    samples, counts = [], collections.Counter()
    for index in range(num_chunks):
        done = json.loads((out_dir / "chunks" / f"{index:06d}.json").read_text(encoding="utf-8"))
        samples += done["samples"]
        counts.update(done["counts"])
    lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    _atomic_write(out_dir / "samples.jsonl", lines)
    if samples:
        table = pa.Table.from_pylist(
            [
                {"messages": s["messages"], "provenance": json.dumps(s["provenance"])}
                for s in samples
            ]
        )
        tmp = out_dir / "samples.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, out_dir / "samples.parquet")
    drawn = sum(counts.values())
    stats = {
        "prompts_with_samples": len({s["provenance"]["task"] for s in samples}),
        "drawn": drawn,
        "kept": counts.get("kept", 0),
        "kept_fraction": counts.get("kept", 0) / drawn if drawn else 0.0,
        "rejected": {k: v for k, v in sorted(counts.items()) if k != "kept"},
    }
    _atomic_write(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats
