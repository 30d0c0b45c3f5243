"""A teacher's top-k log-probs over SFT data, computed once and kept on disk (KDConfig with
`precompute=True`): the distillation run then never holds the teacher in memory.

For every rendered conversation (each split), the teacher runs alone over its tokens (padded
batches, one jitted forward without gradients) and its k most likely next tokens and their
log-probs are kept at each position: int32 ids and float32 log-probs [T, k], packed with the
conversation's tokens into the same rows (train/sft_data.py), so the student reads them at
the same positions. The file, run_dir/teacher_topk.npz, is keyed on the teacher (its dir and
step), k and the data's token ids: a rerun reuses it, a changed teacher or data recomputes it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import model
from model import ModelConfig
from train.distill_loss import teacher_topk
from train.kd import TEACHER_IDS, TEACHER_LOGP
from train.run_dir import digest
from train.sft_data import SFTData
from train.splits import Split

FILE = "teacher_topk.npz"


def _key(source: str, step: int | None, k: int, data: SFTData) -> str:
    ids = {s.value: [digest(r.ids.tolist()) for r in data.split(s)] for s in Split}
    return digest({"teacher": source, "step": step, "k": k, "ids": ids})


def with_teacher_topk(
    data: SFTData,
    cfg: ModelConfig,
    variables: dict,
    k: int,
    run_dir: Path,
    *,
    source: str,
    step: int | None,
    batch_size: int = 16,
) -> SFTData:
    """`data` with the teacher's top-k at every position of every conversation, read from
    run_dir/teacher_topk.npz when it was computed for this teacher, k and data."""
    path = Path(run_dir) / FILE
    key = _key(source, step, k, data)
    arrays = None
    if path.is_file():
        with np.load(path) as saved:
            if json.loads(str(saved["key"])) == key:
                arrays = {name: saved[name] for name in saved.files if name != "key"}
    if arrays is None:
        arrays = _compute(data, cfg, variables, k, batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, key=json.dumps(key), **arrays)
        tmp.replace(path)
    teacher = {}
    for split in Split:
        ids, logp = arrays[f"{split.value}_ids"], arrays[f"{split.value}_logp"]
        offsets = np.cumsum([0] + [len(r) for r in data.split(split)])
        teacher[split] = tuple(
            {TEACHER_IDS: ids[a:b], TEACHER_LOGP: logp[a:b]} for a, b in itertools.pairwise(offsets)
        )
    return dataclasses.replace(data, teacher=teacher)


def _compute(data: SFTData, cfg: ModelConfig, variables: dict, k: int, batch_size: int) -> dict:
    length = max(len(r) for s in Split for r in data.split(s))

    @jax.jit
    def topk(variables_, tokens):
        logits = jax.lax.stop_gradient(model.forward(cfg, variables_, tokens).logits)
        return teacher_topk(logits, k)

    out = {}
    for split in Split:
        ids, logp = [], []
        rendered = data.split(split)
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start : start + batch_size]
            tokens = np.zeros((batch_size, length), np.int32)  # one shape: one compilation
            for i, r in enumerate(chunk):
                tokens[i, : len(r)] = r.ids  # causal: the padding after it changes nothing
            got_ids, got_logp = jax.device_get(topk(variables, jnp.asarray(tokens)))
            for i, r in enumerate(chunk):
                ids.append(got_ids[i, : len(r)])
                logp.append(got_logp[i, : len(r)])
        out[f"{split.value}_ids"] = np.concatenate(ids).astype(np.int32)
        out[f"{split.value}_logp"] = np.concatenate(logp).astype(np.float32)
    return out
