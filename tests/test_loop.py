"""The training loop: exact resume, SIGTERM saves, non-finite handling, damaged and
incompatible checkpoints, run-dir config guard, throughput."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from train.checkpoint import Checkpointer, IncompatibleCheckpointError
from train.lm_train import NonFiniteLossError, train
from train.loop import LoopConfig, TrainLoop
from train.metrics import Throughput
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.run_dir import ConfigMismatchError
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


def _run(run_dir, loop=LOOP, loss=None, train_iter=None, model_cfg=CFG, **kw):
    return train(
        run_dir,
        model_cfg=model_cfg,
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
    # Throughput covers the resumed run's steps only, and never more time than it ran.
    assert 0 < resumed.timed_s <= resumed.wall_s and 0 < resumed.mfu < 1
    assert resumed.timed_tokens <= 3 * B * L
    assert resumed.tokens_per_s == pytest.approx(resumed.timed_tokens / resumed.timed_s)
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


def _damage_by_garbage(folder):
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")


def _damage_by_deleting_arrays(folder):
    # The metadata still reads back, the array data does not.
    for path in folder.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.unlink()


@pytest.mark.parametrize("damage", [_damage_by_garbage, _damage_by_deleting_arrays])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, caplog, damage):
    _run(tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=3, keep=3)
    assert ckpt.steps() == [3, 6]
    damage(tmp_path / "checkpoints" / "6" / "state")
    like = init_state(CFG, make_optimizer(OPT), jax.random.key(0))
    state, meta, _ = ckpt.restore_latest(like, None)
    assert int(state.step) == 3 and meta == {"test": True}
    assert "checkpoint 6" in caplog.text and "damaged" in caplog.text


def _files(run_dir) -> dict:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "tensorboard" not in p.parts
    }


def test_changed_config_is_refused_before_anything_is_written(tmp_path):
    _run(tmp_path, loop=dataclasses.replace(LOOP, steps=3))
    before = _files(tmp_path)
    with pytest.raises(ConfigMismatchError) as err:
        _run(tmp_path, model_cfg=CFG.replace(d_model=64), seed=1)
    message = str(err.value)
    assert "model.d_model: 32 -> 64" in message and "seed: 0 -> 1" in message
    assert "loop.steps" not in message.split("Fields that")[0]  # a safe change is not listed
    assert "--run-dir" in message and "loop.allow_config_change=true" in message
    assert _files(tmp_path) == before


def test_incompatible_checkpoint_is_an_error_not_a_fallback(tmp_path):
    _run(tmp_path, loop=dataclasses.replace(LOOP, steps=3))
    config = (tmp_path / "config.json").read_text()
    allowed = dataclasses.replace(LOOP, allow_config_change=True)
    with pytest.raises(IncompatibleCheckpointError) as err:
        _run(tmp_path, loop=allowed, model_cfg=CFG.replace(d_model=64))
    message = str(err.value)
    assert "checkpoint 3" in message and "not damaged" in message
    assert "state/params/embed/embedding: saved shape (97, 32), this config's (97, 64)" in message
    assert Checkpointer(tmp_path / "checkpoints", every=3, keep=3).steps() == [3]
    assert (tmp_path / "config.json").read_text() == config  # still the checkpoints' config


def test_short_run_throughput_is_consistent(tmp_path):
    result = _run(tmp_path, loop=dataclasses.replace(LOOP, steps=3, checkpoint_every=1))
    # Step 1 (compilation) is untimed; steps 2 and 3 are timed, each saved and step 3 evaluated.
    assert result.timed_tokens == 2 * B * L
    assert 0 < result.timed_s < result.wall_s
    assert result.tokens_per_s == pytest.approx(result.timed_tokens / result.timed_s)
    assert 0 < result.mfu < 1
    records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    timed = [r for r in records if "tokens_per_s" in r]
    assert [r["step"] for r in timed] == [2, 3] and all(r["mfu"] < 1 for r in timed)


def test_throughput_counts_each_steps_device_time(tmp_path):
    """Steps that take >= 0.2 s on the device (dispatched asynchronously) are timed at >= 0.2 s
    each: a step is timed from completion to completion, not from its dispatch."""

    @jax.jit
    def slow(state, x):
        wait = jax.ShapeDtypeStruct((), jnp.float32)
        y = jax.pure_callback(lambda v: (time.sleep(0.2), v)[1], wait, x)
        # The next step's input depends on the callback, so steps cannot overlap on the device.
        return state.replace(step=state.step + 1 + (0.0 * y).astype(jnp.int32)), {
            "tokens": 100.0 + 0.0 * y
        }

    state = init_state(CFG, make_optimizer(OPT), jax.random.key(0))
    loop_cfg = LoopConfig(steps=4, eval_every=100, checkpoint_every=2, progress=False, plots=False)
    loop = TrainLoop(tmp_path, loop_cfg, config={"test": 1}, safe=("loop",), override="-")
    state, _, _ = loop.resume(state)
    result = loop.run(
        state, lambda s, _: slow(s, jnp.float32(1.0)), throughput=Throughput(1.0, peak_flops=1e3)
    )
    assert result.timed_tokens == 300  # steps 2-4; step 1 holds the compilation
    assert result.timed_s >= 3 * 0.2 and result.tokens_per_s <= 100 / 0.2
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Per step, the host's wake-up latency moves time between neighbours; the sum is exact.
    assert [r["step"] for r in records if "tokens_per_s" in r] == [2, 3, 4]
