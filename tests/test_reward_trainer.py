"""Scalar reward-model training at toy scale: the pairs pipeline, learning on the one loop,
exact resume, reloading as a reward function that scores a completion's text exactly as the
trained pairs, and clear errors on bad configs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

import model
from model import hf
from rl import grpo_step
from rl.cold_start import chat_tasks, cold_start
from rl.grpo import GRPOConfig, train_grpo
from rl.grpo_loss import GRPOLossConfig
from rl.judge import JudgeReward
from rl.model_rewards import ScalarReward
from rl.preferences import Scope, preference_pairs, render_pair
from rl.reward_data import PairDataConfig, eval_batches, pair_batch, prepare, train_iterator
from rl.reward_eval import load_reward_model, score_pairs
from rl.reward_model import pair_scores
from rl.reward_trainer import RewardModelConfig, train_reward_model
from tests.conftest import tiny_config
from train.chat import Message, Role, assistant_ids
from train.conversations import BadData
from train.loop import LoopConfig
from train.metrics import read_metrics
from train.optimizer import LRSchedule, OptimizerConfig
from train.run_dir import ConfigMismatchError
from train.sft import SFTConfig, sft
from train.sft_data import SFTDataConfig
from train.splits import Split
from train.tokenizer import Tokenizer, train_bpe

LOOP = LoopConfig(eval_every=6, checkpoint_every=6, progress=False, plots=False)
DATA = PairDataConfig(seq_len=160, batch_pairs=4, heldout_fraction=0.25)
PAIRS = preference_pairs(Split.TRAIN, 64, seed=0)


def _text(pairs) -> str:
    messages = [m for p in pairs for m in (p.prompt[0], p.chosen, p.rejected)]
    return " ".join(f"{m.content} {m.reasoning or ''}" for m in messages)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random V3 as a Hugging Face checkpoint, with a tokenizer for the pairs."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = train_bpe([_text(PAIRS)], 400)
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=256)
    hf.save(cfg, model.init(cfg, jax.random.key(0)), path)
    tokenizer.save(path / "tokenizer.json")
    return path


def _config(base, **changes) -> RewardModelConfig:
    config = RewardModelConfig(
        hf_checkpoint=str(base), data=DATA, peak_lr=3e-3, warmup_fraction=0.0, loop=LOOP
    )
    return dataclasses.replace(config, **changes)


def test_pairs_split_on_the_prompt_and_batch_as_pairs(base, tmp_path):
    tokenizer = Tokenizer.load(base / "tokenizer.json")
    data = prepare(DATA, tokenizer, PAIRS)
    assert data.stats["train_pairs"] + data.stats["heldout_pairs"] == len(PAIRS)
    assert data.stats["heldout_pairs"] > 0
    # Held-out questions are never asked in training (the split is keyed on the prompt).
    prompt = lambda ids: bytes(ids[: list(ids).index(tokenizer.assistant_id)])
    assert not {prompt(p.chosen) for p in data.heldout} & {prompt(p.chosen) for p in data.train}
    batch = next(train_iterator(DATA, data))
    assert batch["inputs"].shape == (4, 2, 160) and batch["margin"].shape == (4,)
    # Each row ends in end-of-sentence where its segment ends.
    last = batch["segment_ids"].sum(-1) - 1
    ends = np.take_along_axis(batch["inputs"], last[..., None], -1)[..., 0]
    assert (ends == tokenizer.eos_id).all()
    batches = list(eval_batches(DATA, data.heldout))
    assert sum(len(kinds) for _, kinds in batches) == len(data.heldout)
    assert batches[-1][0]["weight"].sum() == len(batches[-1][1])
    # The same pairs from a file in TRL's layout give the same data (bad lines skipped, counted).
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": [m.to_dict() for m in p.prompt], "chosen": p.chosen.to_dict(),
                         "rejected": p.rejected.to_dict()}) for p in PAIRS]  # fmt: skip
    path.write_text("\n".join([*lines, "not json"]) + "\n")
    from_file = prepare(dataclasses.replace(DATA, path=str(path), on_bad=BadData.SKIP), tokenizer)
    assert from_file.stats["skipped_bad"] == 1
    assert [p.chosen.tolist() for p in from_file.heldout] == [
        p.chosen.tolist() for p in data.heldout
    ]
    # A pair longer than seq_len is dropped and counted, never cut (the head reads its end).
    short = prepare(dataclasses.replace(DATA, seq_len=90), tokenizer, PAIRS)
    assert short.stats["dropped_over_long"] > 0
    assert max(max(len(p.chosen), len(p.rejected)) for p in short.train) <= 90


def test_reward_model_learns_resumes_exactly_and_scores_completions(base, tmp_path):
    config = _config(base, epochs=None, loop=dataclasses.replace(LOOP, steps=12))
    done = train_reward_model(config, tmp_path / "rm", pairs=PAIRS)
    assert done["steps"] == 12 and done["train_pairs"] + done["heldout_pairs"] == len(PAIRS)
    losses = [r["loss"] for r in read_metrics(tmp_path / "rm") if "loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert done["heldout_accuracy"] > done["heldout_accuracy_before"]
    want = load_reward_model(tmp_path / "rm")
    # A crash after step 6's checkpoint: the rerun continues from there to the same weights.
    shutil.rmtree(tmp_path / "rm" / "checkpoints" / "12")
    again = train_reward_model(config, tmp_path / "rm", pairs=PAIRS)
    steps = [r["step"] for r in read_metrics(tmp_path / "rm") if "loss" in r]
    assert steps == list(range(1, 13))
    assert again["heldout_accuracy"] == pytest.approx(done["heldout_accuracy"])
    rm = load_reward_model(tmp_path / "rm")
    for a, b in zip(jax.tree.leaves(rm.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert rm.step == 12 and rm.data == DATA
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["heldout_accuracy"] == again["heldout_accuracy"]

    # As a reward function on decoded completions: the same scores as the rendered pairs.
    data = prepare(DATA, rm.tokenizer, PAIRS)
    batch = pair_batch(data.heldout[:4], DATA.seq_len)
    want_scores = np.asarray(pair_scores(rm.cfg, rm.params, rm.router_bias, batch))
    reward = ScalarReward(rm)
    heldout = [p for p in PAIRS if _rendered_in(p, data.heldout[:4], rm.tokenizer)]
    prompts = [p.prompt[0].content for p in heldout]
    texts = [_completion(p.chosen, rm.tokenizer) for p in heldout]
    np.testing.assert_allclose(reward(prompts, texts), want_scores[:, 0], atol=1e-5)
    # Prompt ids in a column (chat tasks) are used as the prompt.
    ids = [reward.ids(p, t)[: -len(_body(heldout[i].chosen, rm.tokenizer))]
           for i, (p, t) in enumerate(zip(prompts, texts, strict=True))]  # fmt: skip
    np.testing.assert_allclose(
        reward(["?"] * 4, texts, prompt_ids=ids), want_scores[:, 0], atol=1e-5
    )
    # The summary scope reads the answer alone; a blank completion still gets a score.
    summary_only = ScalarReward(rm, scope=Scope.SUMMARY)
    answers = [
        _completion(Message(Role.ASSISTANT, p.chosen.content), rm.tokenizer) for p in heldout
    ]
    np.testing.assert_allclose(summary_only(prompts, texts), reward(prompts, answers), atol=1e-5)
    assert np.isfinite(reward(prompts[:1], [""])).all()
    # Scored on pairs of its own held-out split, score_pairs agrees with the run's figure.
    own = [p for p in PAIRS if any(_rendered_in(p, [r], rm.tokenizer) for r in data.heldout)]
    scored = score_pairs(rm, own)
    assert scored["pairs"] == len(own) and scored["accuracy"] == done["heldout_accuracy"]


def _body(message, tokenizer):
    return assistant_ids(message, tokenizer, DATA.layout)


def _completion(message, tokenizer) -> str:
    return tokenizer.decode(_body(message, tokenizer)[:-1])


def _rendered_in(pair, rendered, tokenizer) -> bool:
    chosen, _ = render_pair(pair, tokenizer, layout=DATA.layout)
    return any(np.array_equal(chosen, r.chosen) for r in rendered)


def test_a_changed_rerun_is_refused_and_epochs_set_the_steps(base, tmp_path):
    summary = train_reward_model(_config(base, epochs=1.0), tmp_path / "rm", pairs=PAIRS)
    assert summary["steps"] == -(-summary["train_pairs"] // DATA.batch_pairs)
    lrs = [r["learning_rate"] for r in read_metrics(tmp_path / "rm") if "learning_rate" in r]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] < lrs[0]
    with pytest.raises(ConfigMismatchError, match="center_weight"):
        changed = _config(base, epochs=1.0)
        changed = dataclasses.replace(
            changed, loss=dataclasses.replace(changed.loss, center_weight=0.1)
        )
        train_reward_model(changed, tmp_path / "rm", pairs=PAIRS)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"init_from": "runs/x"}, "set one of init_from"),
        ({"epochs": 0.0}, "epochs"),
        ({"peak_lr": 0.0}, "peak_lr"),
        ({"warmup_fraction": 2.0}, "warmup_fraction"),
        ({"optimizer": OptimizerConfig(schedule=LRSchedule(peak_lr=1.0))}, "schedule is built"),
    ],
)
def test_bad_configs_are_refused(base, changes, error):
    with pytest.raises(ValueError, match=error):
        _config(base, **changes)


def test_bad_data_configs_a_missing_base_and_a_too_long_row_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="batch_pairs"):
        PairDataConfig(batch_pairs=0)
    with pytest.raises(ValueError, match="scope"):
        PairDataConfig(scope="summary")
    with pytest.raises(ValueError, match="needs a base"):
        train_reward_model(RewardModelConfig(), tmp_path / "a", pairs=PAIRS)
    long = _config(base, data=dataclasses.replace(DATA, seq_len=512))
    with pytest.raises(ValueError, match="exceeds the base model's max_seq_len"):
        train_reward_model(long, tmp_path / "b", pairs=PAIRS)
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def base_run(base, tmp_path_factory):
    """A 1-step SFT run dir of the base: a jaxseek run dir to start the experiment from."""
    path = tmp_path_factory.mktemp("base_run") / "run"
    config = SFTConfig(
        hf_checkpoint=str(base), epochs=None,
        data=SFTDataConfig(seq_len=160, batch_size=2, heldout_fraction=0.3),
        loop=dataclasses.replace(LOOP, steps=1),
    )  # fmt: skip
    sft(config, path, conversations=cold_start(Split.TRAIN, 20, 0, countdown_fraction=0.0))
    return path


@pytest.mark.slow  # ~1 minute on 2 cores
def test_the_reward_model_experiment_runs_on_a_base_run(base_run, tmp_path):
    from experiments.__main__ import main

    args = ["reward-model", "--run-dir", str(tmp_path / "exp"), "--set", f"base_run={base_run}"]
    for override in ("pairs=48", "eval_pairs=8", "judge_max_new_tokens=6",
                     "scalar.data.seq_len=160", "scalar.data.batch_pairs=4",
                     "scalar.data.heldout_fraction=0.25", "scalar.peak_lr=3e-3",
                     "scalar.loop.progress=false", "scalar.loop.plots=false",
                     "judge.data.seq_len=255", "judge.data.heldout_fraction=0.2",
                     "judge.epochs=0.3", "judge.loop.progress=false",
                     "judge.loop.plots=false"):  # fmt: skip
        args += ["--set", override]
    assert main(args) == 0
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert summary["scalar_steps"] == 9 and summary["scalar_unseen_pairs"] == 8
    assert 0 <= summary["scalar_unseen_accuracy"] <= 1
    assert summary["judge_heldout_loss"] < summary["judge_heldout_loss_before"]
    assert 0 <= summary["judge_unseen_parse_rate"] <= 1
    assert load_reward_model(tmp_path / "exp" / "scalar").step == 9


def test_trained_reward_models_are_grpo_rewards_on_chat_tasks(base, tmp_path, monkeypatch):
    """A scalar reward model and a judge score GRPO rollouts of chat tasks; the policy is
    prompted with the tasks' rendered ids (their special tokens), which the reward reads."""
    config = _config(base, epochs=None, loop=dataclasses.replace(LOOP, steps=2))
    train_reward_model(config, tmp_path / "rm", pairs=PAIRS)
    rm = load_reward_model(tmp_path / "rm")
    scalar, seen = ScalarReward(rm), []

    def recorded(prompts, completions, **columns):
        seen.append((prompts, completions, columns))
        return scalar(prompts, completions, **columns)

    rollouts = []

    def rollout(cfg, variables, prompts, **kwargs):
        rollouts.append(prompts)
        return grpo_step.rollout.__wrapped__(cfg, variables, prompts, **kwargs)

    rollout.__wrapped__ = grpo_step.rollout
    monkeypatch.setattr(grpo_step, "rollout", rollout)
    cfg, variables = hf.load(base)
    judge = JudgeReward(cfg, variables, rm.tokenizer, max_new_tokens=4)
    tasks = chat_tasks(Split.TRAIN, 4, 0, rm.tokenizer)
    grpo = GRPOConfig(
        loss=GRPOLossConfig(beta=0.0), steps=1, prompts_per_step=2, group_size=2,
        max_new_tokens=8, eval_every=1000, checkpoint_every=1000, progress=False, plots=False,
    )  # fmt: skip
    train_grpo(
        tmp_path / "grpo", cfg=cfg, tokenizer=rm.tokenizer, variables=variables,
        reward={recorded: 1.0, judge: 1.0}, train_tasks=tasks, config=grpo,
    )  # fmt: skip
    ((_, completions, columns),) = seen
    assert len(completions) == 4 and len(columns["prompt_ids"]) == 4
    heads = {tuple(t["prompt_ids"]) for t in tasks}
    assert all(tuple(ids) in heads for ids in columns["prompt_ids"])
    record = next(r for r in read_metrics(tmp_path / "grpo") if "reward/recorded" in r)
    assert np.isfinite(record["reward/recorded"])
    # The policy was prompted with those ids, not with the encoding of the prompt's text.
    (prompted,) = rollouts
    assert [list(p) for p in prompted] == [list(ids) for ids in columns["prompt_ids"][::2]]


def test_a_run_dir_that_is_not_a_reward_model_is_refused(base_run, tmp_path):
    with pytest.raises(ValueError, match="not a reward-model run"):
        load_reward_model(base_run)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_reward_model(tmp_path)
