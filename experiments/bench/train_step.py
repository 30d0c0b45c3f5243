"""Training throughput: jaxseek's full train step against Hugging Face DeepseekV3 in PyTorch.

On each config of shared/BENCHMARKS.md (bench-small 8 x 256, bench-d512 4 x 512), in one run:

  jaxseek  train.step.make_train_step (CE + sequence-wise balance loss, clip + V3 AdamW, router
           bias update) jitted with donate_argnums=0, float32, state from train.state.init_state,
           a random-token batch in the train/packing.py contract (train.packing.to_batch)
  HF       transformers.DeepseekV3ForCausalLM, float32, the same architecture and weights
           (model.hf.save -> from_pretrained, config from model.hf_config.config_to_hf),
           labels = input tokens, forward + backward + torch.optim.AdamW, 2 torch threads,
           attn_implementation eager and sdpa (the faster is the baseline; experts use
           transformers' default experts implementation, printed)

Each: median wall time of --steps timed steps after --warmup warm-ups (jaxseek's first warm-up
also compiles; its time is printed). FLOPs per token = train.flops.flops_per_token (the
BENCHMARKS.md convention); MFU against 165 GFLOP/s; ratio = jaxseek tokens/s / best HF's.

Command (repo root):  python -m experiments.bench.train_step [--configs bench-small,bench-d512]
                      [--steps 5] [--warmup 2] [--quick]
Expected runtime: ~2 min on a quiet 2-core CPU (--quick: ~40 s), several times longer when
other jobs share the cores.

Measured 2026-11-29 ~19:45-20:00 UTC, 2-core CPU, jax 0.10.2, torch 2.13, transformers 5.24,
quiet machine (load average 1.2-2.0: only this script), defaults; tokens/s (MFU), two runs:
  bench-small  jaxseek 2397 (42%), 2478 (43%) | HF eager 3128, 3520 | HF sdpa 3405 (60%), 3430
               jaxseek / HF = 0.70x, 0.70x
  bench-d512   jaxseek  719 (48%),  712 (48%) | HF eager 1077, 1011 (67%) | HF sdpa 1083, 967
               jaxseek / HF = 0.66x, 0.70x
HF's default experts implementation in transformers 5.24 is grouped_mm (native CPU
torch.nn.functional.grouped_mm). With --experts eager (its per-expert loop) HF gave 2804 and
649 tokens/s (ratio 0.90x, 1.14x), close to BENCHMARKS.md's 2651 / 748: that baseline is the
eager-experts one, and the default HF here is ~1.25x / ~1.5x faster. Eager vs sdpa attention
is within noise (~+-5%). Under contention (another job at 100% CPU, load average ~4) the
same script gave 1431 vs 843 and 381 vs 101 tokens/s (ratios 1.7x, 3.8x): torch's 2 OpenMP
threads degrade far more than XLA when a core is taken, so trust only quiet-machine ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers

import model
from model import hf
from model.hf_config import config_to_hf
from train.flops import flops_per_token
from train.optimizer import LRSchedule, OptimizerConfig, make_optimizer
from train.packing import TOKENS, to_batch
from train.state import init_state
from train.step import LossConfig, make_train_step

PEAK_FLOPS = 165e9  # JAX's f32 matmul peak on the 2-core CPU (BENCHMARKS.md)
SHAPES = {"bench-small": (8, 256), "bench-d512": (4, 512)}  # batch x seq
LR, BETAS, EPS, WEIGHT_DECAY = 2.2e-4, (0.9, 0.95), 1e-8, 0.1


def median_s(step: Callable[[], float], warmup: int, steps: int) -> tuple[float, float, float]:
    """(median seconds of the timed steps, first warm-up seconds, loss of the first step)."""
    t0 = time.perf_counter()
    first_loss = step()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first_s, first_loss


def random_batch(cfg: model.ModelConfig, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Random tokens as one full document per row, through the packing batch contract."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1), np.int32)
    rows = {
        TOKENS: tokens,
        f"{TOKENS}_segment_ids": np.ones_like(tokens),
        f"{TOKENS}_positions": np.broadcast_to(np.arange(seq + 1, dtype=np.int32), tokens.shape),
    }
    return to_batch(rows, mask_documents=False)


def bench_jaxseek(cfg, batch: dict, warmup: int, steps: int) -> tuple[tuple, dict]:
    schedule = LRSchedule(peak_lr=LR, warmup_steps=1)
    opt_cfg = OptimizerConfig(schedule=schedule, b1=BETAS[0], b2=BETAS[1], eps=EPS)
    optimizer = make_optimizer(opt_cfg)
    state = init_state(cfg, optimizer, jax.random.key(0))
    variables = jax.device_get(state.variables)  # host copy for HF, before donation
    train_step = jax.jit(make_train_step(cfg, LossConfig(), optimizer, schedule), donate_argnums=0)
    device_batch = jax.device_put(batch)
    holder = {"state": state}

    def step() -> float:
        holder["state"], metrics = train_step(holder["state"], device_batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["ce"])

    return median_s(step, warmup, steps), variables


def bench_hf(path: str, cfg, tokens: np.ndarray, attn: str, experts: str | None, warmup, steps):
    hf_cfg = transformers.DeepseekV3Config(**config_to_hf(cfg))
    kw = {"attn_implementation": attn} | ({"experts_implementation": experts} if experts else {})
    net = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, config=hf_cfg, dtype=torch.float32, **kw
    ).train()
    opt = torch.optim.AdamW(
        net.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    ids = torch.from_numpy(tokens).long()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    result = median_s(step, warmup, steps)
    return result, net.config._experts_implementation


def row(name: str, label: str, result: tuple, tokens: int, fpt: float) -> float:
    """Print one table row; tokens/s."""
    s, first_s, loss = result
    tps = tokens / s
    print(
        f"{name:<12} {label:<30} {s:7.3f} {tps:9.0f} {fpt / 1e6:9.1f} "
        f"{tps * fpt / 1e9:8.1f} {tps * fpt / PEAK_FLOPS:6.1%} {loss:8.4f} {first_s:10.2f}"
    )
    return tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="bench-small,bench-d512", help="comma-separated presets")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (>= 1)")
    p.add_argument("--attn", default="eager,sdpa", help="HF attn_implementation(s)")
    p.add_argument("--experts", default="", help="HF experts_implementation (default: its own)")
    p.add_argument("--quick", action="store_true", help="first config only, 1 warm-up, 2 steps")
    args = p.parse_args()
    names = args.configs.split(",")
    warmup, steps = max(1, args.warmup), max(1, args.steps)
    if args.quick:
        names, warmup, steps = names[:1], 1, 2
    torch.set_num_threads(2)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    load = os.getloadavg()
    print(
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"float32, {warmup} warm-up, median of {steps}; load average {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}; MFU vs {PEAK_FLOPS / 1e9:.0f} GFLOP/s"
    )
    head = f"{'config':<12} {'implementation':<30} {'step s':>7} {'tokens/s':>9} {'MFLOP/tok':>9}"
    print(f"{head} {'GFLOP/s':>8} {'MFU':>6} {'1st loss':>8} {'1st step s':>10}")
    for name in names:
        cfg = model.presets.get(name)
        b, seq = SHAPES[name]
        fpt = flops_per_token(cfg, seq)
        batch = random_batch(cfg, b, seq)

        result, variables = bench_jaxseek(cfg, batch, warmup, steps)
        jax_tps = row(name, "jaxseek train step", result, b * seq, fpt)
        hf_tps = {}
        with tempfile.TemporaryDirectory() as tmp:
            hf.save(cfg, variables, tmp)
            del variables
            for attn in args.attn.split(","):
                inputs = batch["inputs"]
                result, experts = bench_hf(tmp, cfg, inputs, attn, args.experts, warmup, steps)
                hf_tps[attn] = row(name, f"HF attn={attn} experts={experts}", result, b * seq, fpt)
        best = max(hf_tps, key=hf_tps.get)
        print(f"{name:<12} ratio jaxseek / HF ({best}) = {jax_tps / hf_tps[best]:.2f}x")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
