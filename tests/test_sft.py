"""SFT end to end at toy scale: from a Hugging Face checkpoint or a run dir, V3's schedule over
the epochs, held-out loss before and after, exact resume, and clear errors on bad configs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

import model
from model import hf
from tests.conftest import tiny_config
from tests.test_sft_loss import TEXT, conversations
from train.loop import LoopConfig
from train.metrics import read_metrics
from train.optimizer import LRSchedule, OptimizerConfig
from train.run import load_run
from train.run_dir import ConfigMismatchError
from train.sft import SFTConfig, schedule, sft
from train.sft_data import SFTDataConfig
from train.step import LossConfig
from train.tokenizer import train_bpe

LOOP = LoopConfig(eval_every=4, eval_batches=2, checkpoint_every=4, progress=False, plots=False)
DATA = SFTDataConfig(seq_len=63, batch_size=4, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random V3 as a Hugging Face checkpoint, with its tokenizer."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = train_bpe([TEXT], 330)
    cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    hf.save(cfg, model.init(cfg, jax.random.key(0)), path)
    tokenizer.save(path / "tokenizer.json")
    return path


def _config(base, **changes) -> SFTConfig:
    config = SFTConfig(hf_checkpoint=str(base), data=DATA, peak_lr=3e-3, min_lr=3e-4, loop=LOOP)
    return dataclasses.replace(config, **changes)


def test_sft_from_a_checkpoint_learns_resumes_exactly_and_reloads(base, tmp_path):
    from transformers import AutoTokenizer

    data = conversations(60)
    config = _config(base, epochs=None, loop=dataclasses.replace(LOOP, steps=8))
    done = sft(config, tmp_path / "run", conversations=data)
    assert done["steps"] == 8 and done["eval_loss"] < done["eval_loss_before"]
    want = load_run(tmp_path / "run").variables
    # A crash after step 4's checkpoint: the rerun continues from step 4 to where the
    # uninterrupted run ended (the data iterator's position is in the checkpoint).
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
    again = sft(config, tmp_path / "run", conversations=data)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 9))
    assert again["train_loss"] == pytest.approx(done["train_loss"], abs=1e-6)
    resumed = load_run(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(resumed.variables), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The run dir loads as a model for generation and as a chat tokenizer for transformers.
    assert resumed.step == 8 and resumed.cfg.vocab_size == resumed.tokenizer.vocab_size
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert hf_tokenizer.apply_chat_template([m.to_dict() for m in data[0]], tokenize=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_conversations"] + summary["heldout_conversations"] == 60
    # Rerun once finished, it trains nothing and reports what the run logged (no NaN).
    rerun = sft(config, tmp_path / "run", conversations=data)
    assert rerun["train_loss"] == pytest.approx(again["train_loss"]) and rerun["steps"] == 8
    assert rerun["tokens_per_s"] > 0


def test_epochs_set_the_steps_and_the_schedule_decays_over_them(base, tmp_path):
    summary = sft(_config(base, epochs=1.0), tmp_path / "run", conversations=conversations(30))
    rows = summary["rows_per_epoch"]
    assert summary["steps"] == -(-rows // DATA.batch_size) and summary["epochs"] >= 1.0
    lrs = [r["learning_rate"] for r in read_metrics(tmp_path / "run") if "learning_rate" in r]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] > 3e-4
    s = schedule(_config(base), 10)
    assert float(s(0)) == pytest.approx(3e-3) and float(s(10)) == pytest.approx(3e-4)
    assert float(s(5)) == pytest.approx(3e-4 + (3e-3 - 3e-4) / 2, rel=1e-5)  # cosine midpoint


@pytest.fixture(scope="module")
def first_run(base, tmp_path_factory):
    """A 2-step SFT run dir (a run dir is a base for the next stage)."""
    path = tmp_path_factory.mktemp("first") / "run"
    config = _config(base, epochs=None, loop=dataclasses.replace(LOOP, steps=2))
    sft(config, path, conversations=conversations(30))
    return path


def test_a_run_dir_base_and_a_changed_rerun(base, first_run, tmp_path):
    data = conversations(30)
    # A second stage from the first run's dir, as the R1 pipeline chains them.
    chained = _config(base, hf_checkpoint=None, init_from=str(first_run), epochs=None,
                      loop=dataclasses.replace(LOOP, steps=2))  # fmt: skip
    summary = sft(chained, tmp_path / "second", conversations=data)
    assert summary["eval_loss_before"] == pytest.approx(
        json.loads((first_run / "summary.json").read_text())["eval_loss"], rel=1e-5
    )
    with pytest.raises(ConfigMismatchError, match="peak_lr"):
        sft(dataclasses.replace(chained, peak_lr=1e-2), tmp_path / "second", conversations=data)
    micro = dataclasses.replace(chained, loss=LossConfig(mask_documents=True, micro_batches=2))
    sft(micro, tmp_path / "second", conversations=data)  # memory only: a safe change


def test_the_sft_experiment_runs_on_a_base_run(first_run, tmp_path):
    from experiments.__main__ import main

    args = ["sft", "--run-dir", str(tmp_path / "exp"), "--set", f"base_run={first_run}"]
    for override in ("samples=80", "countdown_fraction=0", "eval_tasks=3", "max_new_tokens=4",
                     "sft.data.seq_len=63", "sft.data.heldout_fraction=0.2", "sft.epochs=0.5",
                     "sft.loop.progress=false", "sft.loop.plots=false"):  # fmt: skip
        args += ["--set", override]
    assert main(args) == 0
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert 0 <= summary["accuracy_after"] <= 1 and summary["format_before"] is not None
    records = read_metrics(tmp_path / "exp" / "sft")
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, summary["steps"]]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"init_from": "x"}, "one of init_from"),
        ({"loss": LossConfig()}, "mask_documents must be True"),
        ({"optimizer": OptimizerConfig(schedule=LRSchedule(peak_lr=1.0))}, "schedule is built"),
        ({"epochs": 0}, "epochs"),
        ({"min_lr": 1.0}, "min_lr <= peak_lr"),
    ],
)
def test_bad_configs_are_refused(base, changes, error):
    with pytest.raises(ValueError, match=error):
        _config(base, **changes)


def test_a_row_longer_than_the_model_and_a_missing_base_are_refused(base, tmp_path):
    too_long = _config(base, data=dataclasses.replace(DATA, seq_len=200))
    with pytest.raises(ValueError, match="exceeds the base model's max_seq_len 64"):
        sft(too_long, tmp_path / "run", conversations=conversations(10))
    with pytest.raises(ValueError, match="needs a base"):
        sft(_config(base, hf_checkpoint=None), tmp_path / "run2", conversations=[])
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        sft(_config(base, hf_checkpoint=str(tmp_path)), tmp_path / "run2", conversations=[])
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
