"""Rejection sampling: R1's filters, dedup, K per prompt, provenance, and an interrupted run
that continues to exactly what an uninterrupted one writes (no sample lost or duplicated)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import model
from model import hf
from rl import rejection_sampling
from rl.cold_start import cold_start
from rl.rejection_sampling import Policy, RejectionConfig, question_of, rejection_sample, to_message
from rl.rewards import format_reward, integer_accuracy
from rl.sample_filters import FilterConfig, duplicate_of, reasoning_checks
from rl.tasks import arithmetic_tasks
from tests.conftest import tiny_config
from train.chat import Layout, Message, Role
from train.conversations import load_conversations
from train.loop import LoopConfig
from train.run_dir import ConfigMismatchError
from train.sft import SFTConfig, sft
from train.sft_data import SFTDataConfig
from train.splits import Split
from train.tokenizer import train_bpe

TASKS = arithmetic_tasks(Split.TRAIN, 7, seed=0, max_digits=1)


def _answer(reasoning: str, answer: object) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"


def pool(gold: int) -> list[str]:
    """The completions the fake policy draws from, one per kind of outcome."""
    return [
        _answer(f"I add the digits and get {gold}.", gold),  # kept
        _answer(f"I add the digits and get {gold}.", gold),  # duplicate of the first
        _answer(f"I add the digits and  get {gold}.\n", gold),  # whitespace-only duplicate
        _answer(f"Adding up the two numbers gives {gold}, checked twice.", gold),  # kept
        _answer(f"Counting on from the first: {gold}.", gold),  # kept, or over K
        _answer("I add them.", gold + 1),  # incorrect
        _answer(f"```python\nprint({gold})\n```", gold),  # code block
        _answer(f"I add and check: 我们计算得到 {gold}", gold),  # mixed language
        _answer("x" * 300, gold),  # over-long paragraph (limit 200 here)
        "no tags at all",  # incorrect (no format)
    ]


class FakeGeneration:
    def __init__(self, completions):
        self._completions = completions

    def completions(self):
        return self._completions


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(t for task in TASKS for t in [*pool(task["answer"]), task["prompt"]])
    return train_bpe([text], 400)


@pytest.fixture
def fake_generate(monkeypatch, tokenizer):
    """A policy whose samples are drawn from `pool`, by the chunk's key: deterministic per
    chunk, whatever ran before. Counts its calls; `fail_at` makes call n raise."""
    calls = {"n": 0, "fail_at": None}
    answers = {tuple(tokenizer.encode(t["prompt"])): t["answer"] for t in TASKS}

    def generate(cfg, variables, prompts, *, num_samples, rng, max_new_tokens, **_):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt("killed")
        pick = np.random.default_rng(np.asarray(jax.random.key_data(rng)).tolist())
        out = []
        for prompt in prompts:
            texts = pool(answers[tuple(prompt)])
            for j in pick.permutation(len(texts))[:num_samples]:
                ids = tokenizer.encode(texts[j])[:max_new_tokens]
                finished = len(ids) < max_new_tokens
                out.append([*ids, tokenizer.eos_id] if finished else ids)
        return FakeGeneration(out)

    monkeypatch.setattr(rejection_sampling.model, "generate", generate)
    return calls


CONFIG = RejectionConfig(
    samples_per_prompt=10, keep_per_prompt=2, max_new_tokens=256, chunk_prompts=3,
    require={"accuracy": 1.0}, filters=FilterConfig(max_paragraph_chars=200), progress=False,
)  # fmt: skip
REWARDS = {"accuracy": integer_accuracy, "format": format_reward}


def _policy(tokenizer) -> Policy:
    cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    return Policy(cfg, {}, tokenizer, checkpoint="runs/policy", step=7)


def test_filters_dedup_and_keep_at_most_k_with_provenance(fake_generate, tokenizer, tmp_path):
    stats = rejection_sample(
        CONFIG, tmp_path / "rs", policy=_policy(tokenizer), tasks=TASKS, reward_fns=REWARDS
    )
    n = len(TASKS)
    assert stats["drawn"] == 10 * n and stats["kept"] == 2 * n
    assert stats["kept_fraction"] == pytest.approx(0.2)
    rejected = stats["rejected"]
    assert rejected["incorrect"] == 2 * n and rejected["code_block"] == n
    assert rejected["mixed_language"] == n and rejected["long_paragraph"] == n
    repeats = ("duplicate", "near_duplicate", "over_keep")
    assert sum(rejected.get(k, 0) for k in repeats) == 3 * n
    assert rejected["duplicate"] >= 1
    samples = [json.loads(line) for line in (tmp_path / "rs" / "samples.jsonl").open()]
    assert len(samples) == 2 * n
    for sample in samples:
        p = sample["provenance"]
        assert p["checkpoint"] == "runs/policy" and p["step"] == 7 and 0 <= p["sample"] < 10
        assert p["rewards"]["accuracy"] == 1.0 and set(p["rewards"]) == set(REWARDS)
        assert all(p["filters"].values()) and set(p["filters"]) >= {"code_block", "unique"}
        task = TASKS[p["task"]]
        user, assistant = sample["messages"]
        assert user == {"role": "user", "content": f"{question_of(task, tokenizer)}"}
        assert assistant["content"] == str(task["answer"]) and assistant["reasoning_content"]
    per_task = [sum(s["provenance"]["task"] == i for s in samples) for i in range(n)]
    assert per_task == [2] * n
    # The kept samples of a prompt are distinct; both files load as SFT conversations.
    for i in range(n):
        texts = [
            s["messages"][1]["reasoning_content"] for s in samples if s["provenance"]["task"] == i
        ]
        assert len(set(texts)) == len(texts)
    for name in ("samples.jsonl", "samples.parquet"):
        conversations, skipped = load_conversations(tmp_path / "rs" / name)
        assert len(conversations) == 2 * n and not skipped
    assert json.loads((tmp_path / "rs" / "stats.json").read_text()) == stats


def test_an_interrupted_run_continues_to_the_same_dataset(fake_generate, tokenizer, tmp_path):
    policy = _policy(tokenizer)
    whole = rejection_sample(CONFIG, tmp_path / "whole", policy=policy, tasks=TASKS,
                             reward_fns=REWARDS)  # fmt: skip
    fake_generate.update(n=0, fail_at=3)  # killed in the third of three chunks
    with pytest.raises(KeyboardInterrupt):
        rejection_sample(CONFIG, tmp_path / "cut", policy=policy, tasks=TASKS, reward_fns=REWARDS)
    assert sorted(p.name for p in (tmp_path / "cut" / "chunks").iterdir()) == [
        "000000.json", "000001.json"
    ]  # fmt: skip
    fake_generate.update(n=0, fail_at=None)
    again = rejection_sample(CONFIG, tmp_path / "cut", policy=policy, tasks=TASKS,
                             reward_fns=REWARDS)  # fmt: skip
    assert fake_generate["n"] == 1  # only the unfinished chunk was sampled again
    assert again == whole
    for name in ("samples.jsonl", "stats.json"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()
    # A finished run reruns to the same files without sampling; a changed config is refused.
    rejection_sample(CONFIG, tmp_path / "cut", policy=policy, tasks=TASKS, reward_fns=REWARDS)
    assert fake_generate["n"] == 1
    changed = dataclasses.replace(CONFIG, keep_per_prompt=3)
    with pytest.raises(ConfigMismatchError, match="keep_per_prompt"):
        rejection_sample(changed, tmp_path / "cut", policy=policy, tasks=TASKS, reward_fns=REWARDS)
    with pytest.raises(ConfigMismatchError, match="count"):
        rejection_sample(CONFIG, tmp_path / "cut", policy=policy, tasks=TASKS[:5],
                         reward_fns=REWARDS)  # fmt: skip


def test_a_real_policy_runs_end_to_end(tokenizer, tmp_path):
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    policy = Policy(cfg, model.init(cfg, jax.random.key(0)), tokenizer, "random", 0)
    config = dataclasses.replace(CONFIG, samples_per_prompt=3, keep_per_prompt=1,
                                 max_new_tokens=6, require={"format": 0.0})  # fmt: skip
    stats = rejection_sample(config, tmp_path, policy=policy, tasks=TASKS[:4], reward_fns=REWARDS)
    assert stats["drawn"] == 12 and stats["kept"] + sum(stats["rejected"].values()) == 12


def test_checks_on_the_chain_of_thought():
    cfg = FilterConfig(max_paragraph_chars=20)
    assert reasoning_checks(cfg, "short\n\nalso short") == {
        "mixed_language": True, "long_paragraph": True, "code_block": True
    }  # fmt: skip
    assert not reasoning_checks(cfg, "a paragraph far longer than twenty")["long_paragraph"]
    assert not reasoning_checks(cfg, "see ```x = 1```")["code_block"]
    assert not reasoning_checks(cfg, "the sum 是 四 十 六")["mixed_language"]
    off = FilterConfig(min_script_share=None, max_paragraph_chars=None, no_code_blocks=False)
    assert reasoning_checks(off, "```我```") == {}
    assert duplicate_of(cfg, "a b  c", ["a b c"]) == "duplicate"
    near = "one two three four five six seven eight nine ten eleven"
    assert duplicate_of(cfg, near + " twelve", [near]) == "near_duplicate"
    assert duplicate_of(cfg, "entirely other words here now", [near]) is None
    with pytest.raises(ValueError, match="near_duplicate"):
        FilterConfig(near_duplicate=1.5)


def test_completions_become_assistant_turns(tokenizer):
    assert to_message(_answer("r", 4), tokenizer, Layout.READABLE) == Message(
        Role.ASSISTANT, "4", reasoning="r"
    )
    assert to_message("just text", tokenizer, Layout.READABLE) == Message(
        Role.ASSISTANT, "just text"
    )
    assert to_message("  ", tokenizer, Layout.READABLE) is None
    assert question_of(TASKS[0], tokenizer).endswith("= ?")
    assert question_of({"prompt": "x", "question": "What?"}, tokenizer) == "What?"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"keep_per_prompt": 9, "samples_per_prompt": 4}, "keep_per_prompt must be <="),
        ({"temperature": 0.0}, "temperature"),
        ({"require": {}}, "require is empty"),
        ({"chunk_prompts": 0}, "chunk_prompts"),
    ],
)
def test_bad_configs_are_refused(changes, error):
    with pytest.raises(ValueError, match=error):
        RejectionConfig(**changes)


def test_a_required_reward_that_is_not_computed_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="require names"):
        rejection_sample(RejectionConfig(require={"judge": 0.5}), tmp_path,
                         policy=_policy(tokenizer), tasks=TASKS, reward_fns=REWARDS)  # fmt: skip


@pytest.mark.slow  # ~1 minute on 2 cores
def test_the_experiment_samples_from_an_sft_run_and_resumes(tokenizer, tmp_path):
    from experiments.__main__ import main

    base = tmp_path / "base"
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    hf.save(cfg, model.init(cfg, jax.random.key(0)), base)
    tokenizer.save(base / "tokenizer.json")
    sft_config = SFTConfig(
        hf_checkpoint=str(base), epochs=None, loop=LoopConfig(steps=1, progress=False, plots=False),
        data=SFTDataConfig(seq_len=120, batch_size=2, heldout_fraction=0.3),
    )  # fmt: skip
    sft(
        sft_config,
        tmp_path / "sft",
        conversations=cold_start(Split.TRAIN, 20, 0, countdown_fraction=0.0),
    )
    args = ["rejection-sampling", "--run-dir", str(tmp_path / "rs"), "--set",
            f"policy_run={tmp_path / 'sft'}"]  # fmt: skip
    for override in ("tasks=4", "rejection.samples_per_prompt=2", "rejection.keep_per_prompt=1",
                     "rejection.max_new_tokens=8", "rejection.progress=false"):  # fmt: skip
        args += ["--set", override]
    assert main(args) == 0
    summary = json.loads((tmp_path / "rs" / "summary.json").read_text())
    assert summary["drawn"] == 8 and summary["policy_step"] == 1
    assert main(args) == 0  # a finished run reruns to the same dataset
    assert json.loads((tmp_path / "rs" / "summary.json").read_text())["drawn"] == 8
