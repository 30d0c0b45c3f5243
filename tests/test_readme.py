"""Every ```python block of README.md runs as written, so the documented API cannot drift.

Blocks run in order in one namespace, as in a notebook. A prelude defines the names the README
leaves to the reader (`tokens`, `pos`, `seg`); placeholders (paths, the default pre-training
config, GRPO's sizes) are replaced by tiny fixtures, and each replaced text must still be in the
README, so renaming one there fails here instead of silently skipping it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import model
from tests.test_pretrain import _tiny_pretrain as tiny_pretrain

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)

# README text -> what runs instead. The left sides are placeholders for the reader's own
# paths; the wrapped configs are built as written, then shrunk to a few tiny steps.
_API = {
    # A checkpoint of the block's own cfg and variables (no second model.init).
    '"path/to/DeepSeek-V3"': "saved_checkpoint(cfg, variables)",
    '"out_dir"': "OUT_DIR",
}
_TRAINING = {
    "PretrainConfig()": "tiny_pretrain(PretrainConfig())",
    '"runs/my-run"': "RUN_DIR",
    '"runs/my-grpo"': "GRPO_DIR",
    "config=GRPOConfig(": "config=tiny_grpo(",
    "SFTConfig(init_from=": "tiny_sft(init_from=",
    '"runs/my-sft"': "SFT_DIR",
    "RewardModelConfig(init_from=": "tiny_rm(init_from=",
    '"runs/my-rm"': "RM_DIR",
    "RejectionConfig(samples_per_prompt=8, keep_per_prompt=2)": "tiny_rejection()",
    '"runs/my-rs"': "RS_DIR",
    "preference_pairs(Split.TRAIN, 2000,": "preference_pairs(Split.TRAIN, 40,",
    "preference_pairs(Split.HELDOUT, 100,": "preference_pairs(Split.HELDOUT, 8,",
    "chat_tasks(Split.TRAIN, 200,": "chat_tasks(Split.TRAIN, 3,",
    "reasoning_tasks(Split.HELDOUT, 110,": "reasoning_tasks(Split.HELDOUT, 5,",
    "general_tasks(Split.HELDOUT, 48,": "general_tasks(Split.HELDOUT, 3,",
    "max_new_tokens=192)": "max_new_tokens=8)",
    '"runs/my-student"': "STUDENT_DIR",
    "SFTConfig(hf_checkpoint=": "tiny_sft(hf_checkpoint=",
    '"runs/my-kd"': "KD_DIR",
    '"runs/my-opd"': "OPD_DIR",
    "config=OnPolicyConfig(steps=100)": "config=tiny_on_policy()",
}


def _blocks() -> list[tuple[int, str]]:
    """(line number, code) of each python block, in README order."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m[1]) for m in _BLOCK.finditer(text)]


def _run(blocks: list[tuple[int, str]], substitutions: dict[str, str], namespace: dict) -> None:
    code = {line: source for line, source in blocks}
    joined = "\n".join(code.values())
    for old in substitutions:
        assert old in joined, f"README placeholder {old!r} is gone: update tests/test_readme.py"
    for line, source in code.items():
        for old, new in substitutions.items():
            source = source.replace(old, new)
        exec(compile(source, f"README.md block at line {line}", "exec"), namespace)


def _split() -> tuple[list, list]:
    """(API + generation blocks, training + RL blocks); a new block must be placed here."""
    blocks = _blocks()
    heads = [code.splitlines()[0] for _, code in blocks]
    assert heads == [
        "import jax, model",  # Public API
        "prompts = [[1, 5, 9], [1, 7]]  # token ids; rows may differ in length",  # Generation
        "from train.pretrain import PretrainConfig, pretrain  # the whole pre-training run",
        "from train.chat import Layout, Message, Role, render, save_for_transformers",
        "from rl.grpo import GRPOConfig, train_grpo, constant_lr",
        'from rl.preferences import preference_pairs  # or load_pairs("pairs.jsonl"), TRL layout',
        "from rl import world, world_rewards",
        "import jax",  # Dense students and distillation
    ], f"README python blocks changed; wire each into tests/test_readme.py: {heads}"
    return blocks[:2], blocks[2:]


def _packed_inputs() -> dict:
    """tokens [2, 12], and two packed documents per row: positions restart, segments 1 and 2."""
    tokens = np.random.default_rng(0).integers(0, 100, (2, 12)).astype(np.int32)
    pos = np.tile(np.r_[np.arange(7), np.arange(5)], (2, 1)).astype(np.int32)
    seg = np.tile(np.r_[np.ones(7), np.full(5, 2)], (2, 1)).astype(np.int32)
    return {"tokens": tokens, "pos": pos, "seg": seg}


def _api_namespace(tmp_path: Path) -> dict:
    def saved_checkpoint(cfg, variables) -> str:
        model.hf.save(cfg, variables, tmp_path / "ckpt")
        return str(tmp_path / "ckpt")

    inputs = _packed_inputs()
    return inputs | {"saved_checkpoint": saved_checkpoint, "OUT_DIR": str(tmp_path / "out")}


def test_readme_public_api_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes by accident stays in tmp
    namespace = _api_namespace(tmp_path)
    _run(_split()[0][:1], _API, namespace)
    assert namespace["out"].logits.shape == (2, 12, namespace["cfg"].vocab_size)
    assert model.hf.load(tmp_path / "out")[0] == namespace["cfg"]


@pytest.mark.slow
def test_readme_generation_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _api_namespace(tmp_path)
    _run(_split()[0], _API, namespace)
    assert namespace["out"].tokens.shape == (2, 64) and namespace["stats"].acceptance_rate >= 0


def _tiny_pretrain(config):
    return tiny_pretrain(steps=2, base=config)


def _tiny_sft(**fields):
    from train.loop import LoopConfig
    from train.sft import SFTConfig

    config = SFTConfig(**fields)
    loop = LoopConfig(steps=2, eval_every=2, eval_batches=1, checkpoint_every=2, progress=False)
    data = dataclasses.replace(config.data, seq_len=32, batch_size=2)
    return dataclasses.replace(config, epochs=None, data=data, loop=loop)


def _tiny_rm(**fields):
    from rl.reward_trainer import RewardModelConfig
    from train.loop import LoopConfig

    config = RewardModelConfig(**fields)
    loop = LoopConfig(steps=2, eval_every=2, checkpoint_every=2, progress=False, plots=False)
    data = dataclasses.replace(config.data, batch_pairs=2, heldout_fraction=0.25)
    return dataclasses.replace(config, epochs=None, data=data, loop=loop)


def _tiny_rejection():
    from rl.rejection_sampling import RejectionConfig

    return RejectionConfig(samples_per_prompt=2, keep_per_prompt=1, max_new_tokens=4,
                           require={"format": 0.0}, progress=False)  # fmt: skip


def _tiny_grpo(**fields):
    from rl.grpo import GRPOConfig

    small = dict(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, eval_every=1)
    return dataclasses.replace(GRPOConfig(**fields), **small, progress=False, plots=False)


def _tiny_on_policy():
    from rl.on_policy_distill import OnPolicyConfig

    return OnPolicyConfig(steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                          progress=False, plots=False)  # fmt: skip


@pytest.mark.slow
def test_readme_training_and_rl_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {
        "tiny_pretrain": _tiny_pretrain,
        "tiny_grpo": _tiny_grpo,
        "tiny_sft": _tiny_sft,
        "tiny_rm": _tiny_rm,
        "tiny_rejection": _tiny_rejection,
        "RM_DIR": str(tmp_path / "my-rm"),
        "RS_DIR": str(tmp_path / "my-rs"),
        "RUN_DIR": str(tmp_path / "my-run"),
        "SFT_DIR": str(tmp_path / "my-sft"),
        "GRPO_DIR": str(tmp_path / "my-grpo"),
        "tiny_on_policy": _tiny_on_policy,
        "STUDENT_DIR": str(tmp_path / "my-student"),
        "KD_DIR": str(tmp_path / "my-kd"),
        "OPD_DIR": str(tmp_path / "my-opd"),
    }
    _run(_split()[1], _TRAINING, namespace)
    assert namespace["summary"]["steps"] == 2 and namespace["run"].step == 2
    assert (tmp_path / "my-grpo" / "metrics.jsonl").is_file()
    assert namespace["rendered"].trained.any() and namespace["sft_summary"]["steps"] == 2
    assert namespace["rm_summary"]["steps"] == 2 and 0 <= namespace["unseen"]["accuracy"] <= 1
    assert namespace["stats"]["drawn"] == 6 and (tmp_path / "my-rs" / "samples.jsonl").is_file()
    assert len(namespace["records"]) == 8 and {"format", "helpful"} <= set(namespace["row"])
    assert namespace["kd_summary"]["steps"] == 2 and namespace["opd"].step == 1
