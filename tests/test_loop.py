"""The training loop: exact resume, SIGTERM saves, non-finite handling, corrupt checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from train.checkpoint import Checkpointer
from train.loop import LoopConfig, NonFiniteLossError, train
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.state import init_state
from train.step import LossConfig, NonFinite

B, L = 2, 16
CFG = tiny_config(num_layers=2)
OPT = OptimizerConfig(schedule=LRSchedule(peak_lr=3e-3, warmup_steps=2, final_lr=3e-3))
LOOP = LoopConfig(
    steps=6, eval_every=3, eval_batches=2, checkpoint_every=3, progress=False, plots=False
)


def _batch(index: int) -> dict:
    rng = np.random.default_rng(index)
    start = rng.integers(0, CFG.vocab_size, (B, 1))
    tokens = ((start + np.arange(L + 1) * 3) % CFG.vocab_size).astype(np.int32)  # learnable
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
        "loss_mask": np.ones((B, L), np.float32),
    }


def _train_iter():
    return iter(grain.MapDataset.range(10**6).map(lambda i: _batch(int(i))).to_iter_dataset())


class _SignalOnNext:
    """A checkpointable iterator that sends SIGTERM when batch number `at` is taken."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.taken = inner, at, 0

    def __next__(self):
        self.taken += 1
        if self.taken == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    # grain's checkpoint handler takes bytes from iterators that are not its own.
    def get_state(self) -> bytes:
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.inner.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


def _eval():
    return (_batch(10**7 + i) for i in range(2))


def _run(run_dir, loop=LOOP, loss=None, train_iter=None, **kw):
    return train(
        run_dir,
        model_cfg=CFG,
        loss_cfg=loss or LossConfig(),
        opt_cfg=OPT,
        loop_cfg=loop,
        train_iter=train_iter or _train_iter(),
        eval_batches=_eval,
        seq_len=L,
        meta={"test": True},
        **kw,
    )


def _losses(run_dir) -> dict[int, float]:
    lines = (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in lines if "loss" in r and "eval/loss" not in r}


def test_resume_continues_with_identical_losses(tmp_path):
    full = _run(tmp_path / "full")
    half = _run(tmp_path / "split", loop=dataclasses.replace(LOOP, steps=3))
    assert half.step == 3
    resumed = _run(tmp_path / "split")  # a new process would do exactly this
    assert resumed.step == full.step == 6
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)
    assert a[6] < a[1]  # and it learns
    assert resumed.eval["ce"] == pytest.approx(full.eval["ce"], rel=1e-6)
    assert full.tokens_per_s > 0 and 0 < full.mfu < 1
    again = _run(tmp_path / "full")  # nothing left to train: it reports the held-out loss
    assert again.step == 6 and again.eval["ce"] == pytest.approx(full.eval["ce"], rel=1e-6)


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    result = _run(tmp_path, train_iter=_SignalOnNext(_train_iter(), at=4))
    assert result.interrupted and result.step == 4
    assert Checkpointer(tmp_path / "checkpoints", every=3, keep=3).steps()[-1] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    resumed = _run(tmp_path)
    assert resumed.step == 6 and not resumed.interrupted


def _poison(state):
    emb = state.params["embed"]["embedding"]
    return state.replace(params={**state.params, "embed": {"embedding": emb * jnp.nan}})


def test_non_finite_loss_halts_without_saving_it(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 1"):
        _run(tmp_path, initial_state=_poison)
    assert Checkpointer(tmp_path / "checkpoints", every=3, keep=3).steps() == []


def test_non_finite_loss_can_be_skipped(tmp_path):
    loss = LossConfig(nonfinite=NonFinite.SKIP)
    result = _run(
        tmp_path, loop=dataclasses.replace(LOOP, steps=2), loss=loss, initial_state=_poison
    )
    assert result.step == 2 and int(result.train["skipped"]) == 2


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    _run(tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=3, keep=3)
    assert ckpt.steps() == [3, 6]
    for path in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    like = init_state(CFG, make_optimizer(OPT), jax.random.key(0))
    state, meta, _ = ckpt.restore_latest(like, None)
    assert int(state.step) == 3 and meta == {"test": True}
    assert "unreadable" in caplog.text
