"""Decode throughput: cached absorbed MLA decode against no-cache recomputation and HF generate.

One tiny model (v3-tiny at max_seq_len 512: the pretrain-tiny model), batch 8, prompt 128,
384 new tokens, greedy, float32, in one run:

  cached absorbed   model.generate's jitted loop: prefill, then one token per step over the
                    latent cache (kv_lora + rope values per token per layer), W_UK / W_UV
                    absorbed into the query and output
  cached expanded   the same loop rebuilding per-head K/V from the whole latent cache at every
                    step (what MaxText's MLA decode does)
  no cache          every step re-runs the full forward pass over the fixed [8, 512] buffer
                    (a static-shape JAX decoder without a cache) and reads one position
  MTP speculative   model.generate_speculative: MTP depth 1 drafts, the main model verifies
                    two tokens per step; same tokens as greedy (checked)
  HF generate       transformers DeepseekV3ForCausalLM.generate, PyTorch float32, 2 threads,
                    its default cache (per-head K and V), the same weights via model.hf.save

Each: one untimed warm-up call (compilation for JAX), then the median of --repeats timed
calls; tokens/s = 8 x 384 / seconds (prefill included for all). Ratios are against the
cached absorbed path. Also prints KV cache bytes per token for v3-671b and this model.

With --ckpt RUN_DIR (e.g. runs/pretrain-tiny) the weights are the run's and the prompts are
held-out text as the model was trained on (stdlib code and arithmetic documents joined by EOS,
cut at 128 tokens), so the MTP acceptance rate is meaningful; without it the weights are
random (acceptance near 0, throughput the same).

Command (repo root):  python -m experiments.bench.decode [--ckpt runs/pretrain-tiny]
                      [--repeats 3] [--skip-no-cache]
Expected runtime: ~4 min on a quiet 2-core CPU (the no-cache path takes most of it).

Measured 2026-11-29 ~21:05 UTC, 2-core CPU, jax 0.10.2, torch 2.13, transformers 5.24, quiet
machine, --ckpt runs/pretrain-tiny --repeats 3 (tokens/s, ratio to cached absorbed; every path
produced the same tokens): cached absorbed 3660 (1.00x) | cached expanded 954 (0.26x) | no
cache 34 (0.01x) | MTP speculative 1802 (0.49x) | HF generate 623 (0.17x). MTP acceptance
0.641 (1194 of 1863 drafts), 318 verify steps for 383 tokens per row. A verify step plus the
MTP block costs ~2.4x a plain step on this CPU, hence the slowdown; see the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import model
from model import hf
from model.generate import generate_padded
from model.hf_config import config_to_hf
from model.sampling import Sampling
from model.speculative import speculative_padded

BATCH, PROMPT, NEW = 8, 128, 384
GREEDY = Sampling(temperature=0.0)


def timed(call: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(median seconds over `repeats` calls after one warm-up, the last result)."""
    result = call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


@jax.jit(static_argnums=(0, 1))
def no_cache_greedy(cfg, new: int, variables, prompts_BxP):
    """Greedy decoding that re-runs the full forward pass over a [B, P + new] buffer per token."""
    B, P = prompts_BxP.shape
    buffer = jnp.zeros((B, P + new), jnp.int32).at[:, :P].set(prompts_BxP)

    def step(i, buffer):
        logits = model.forward(cfg, variables, buffer).logits
        last = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False)
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_index_in_dim(buffer, token, P + i, axis=1)

    return jax.lax.fori_loop(0, new, step, buffer)[:, P:]


def prompts_and_weights(ckpt: str | None):
    """(cfg, variables, prompts [B, P]) from a run dir, or v3-tiny at random with random tokens."""
    if ckpt is None:
        cfg = model.presets.get("v3-tiny").replace(max_seq_len=PROMPT + NEW)
        variables = model.init(cfg, jax.random.key(0))
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, PROMPT))
        return cfg, variables, prompts.astype(np.int32)
    from train.run import load_run
    from train.sources import ArithmeticSource, StdlibSource, load_documents
    from train.splits import Split

    run = load_run(ckpt)
    code = load_documents(StdlibSource(max_bytes=1 << 20), Split.HELDOUT)
    sums = load_documents(ArithmeticSource(heldout_count=200), Split.HELDOUT)
    prompts = [_packed(run.tokenizer, code, sums, row) for row in range(BATCH)]
    cfg = run.cfg.replace(max_seq_len=max(run.cfg.max_seq_len, PROMPT + NEW))
    return cfg, run.variables, np.asarray(prompts, np.int32)


def _packed(tokenizer, code: list[str], sums: list[str], row: int) -> list[int]:
    """PROMPT tokens of held-out documents joined by EOS as in training, code and arithmetic
    mixed 4:1 like pretrain-tiny's data; the prompt ends inside a document."""
    ids, k = [], 0
    while len(ids) < PROMPT:
        doc = sums[(row * 7 + k) % len(sums)] if k % 5 == 4 else code[(row * 5 + k) % len(code)]
        ids += [*tokenizer.encode(doc)[: PROMPT // 2], tokenizer.eos_id]
        k += 1
    return ids[:PROMPT]


def bench_hf(cfg, variables, prompts: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(cfg, variables, tmp)
        hf_cfg = transformers.DeepseekV3Config(**config_to_hf(cfg))
        net = transformers.DeepseekV3ForCausalLM.from_pretrained(
            tmp, config=hf_cfg, dtype=torch.float32
        ).eval()
    ids = torch.from_numpy(prompts).long()

    def call():
        with torch.no_grad():
            out = net.generate(
                ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True
            )
        return out[:, PROMPT:].numpy()

    return timed(call, repeats)


def cache_table() -> None:
    print("\nKV cache bytes per token (all layers, model dtype):")
    for name in ("v3-671b", "v3-tiny"):
        cfg = model.presets.get(name)
        latent, mha = model.cache_bytes_per_token(cfg), model.mha_cache_bytes_per_token(cfg)
        m, itemsize = cfg.mla, np.dtype(jnp.dtype(cfg.dtype)).itemsize
        # The V2 paper's comparison: MHA with head dim 128 for both K and V (no RoPE part).
        mha_v2 = 2 * m.num_heads * m.qk_nope_head_dim * cfg.num_layers * itemsize
        print(
            f"  {name:<8} latent {latent:>11,} | MHA K {m.qk_head_dim} + V {m.v_head_dim}: "
            f"{mha:>11,} ({mha / latent:.1f}x) | MHA 2 x {m.qk_nope_head_dim} (V2 paper): "
            f"{mha_v2:>11,} ({mha_v2 / latent:.1f}x)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="a run dir (default: random v3-tiny weights)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (median)")
    p.add_argument("--skip-no-cache", action="store_true", help="skip the slow no-cache path")
    args = p.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    cfg, variables, prompts = prompts_and_weights(args.ckpt)
    lengths = np.full((BATCH,), PROMPT, np.int32)
    load = os.getloadavg()
    print(
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}; weights: {args.ckpt or 'random v3-tiny'}; "
        f"batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, greedy, float32; "
        f"median of {args.repeats}; load average {load[0]:.2f}"
    )
    rng = jax.random.key(0)

    def jax_generate(absorbed: bool):
        def call():
            out = generate_padded(
                cfg, GREEDY, NEW, (), variables, prompts, lengths, rng, absorbed=absorbed
            )
            return np.asarray(out.tokens)

        return call

    def speculative():
        out, stats = speculative_padded(cfg, NEW, (), variables, prompts, lengths)
        return np.asarray(out.tokens), stats

    rows = {}
    rows["cached absorbed"] = timed(jax_generate(True), args.repeats)
    rows["cached expanded"] = timed(jax_generate(False), args.repeats)
    if not args.skip_no_cache:
        rows["no cache"] = timed(
            lambda: np.asarray(no_cache_greedy(cfg, NEW, variables, prompts)), args.repeats
        )
    seconds, (spec_tokens, stats) = timed(speculative, args.repeats)
    rows["MTP speculative"] = (seconds, spec_tokens)
    rows["HF generate"] = bench_hf(cfg, variables, prompts, args.repeats)

    base_s, base_tokens = rows["cached absorbed"]
    print(f"\n{'path':<18} {'seconds':>8} {'tokens/s':>9} {'vs absorbed':>12} {'same tokens':>12}")
    for name, (seconds, tokens) in rows.items():
        same = f"{np.mean(tokens == base_tokens):.1%}"
        tps = BATCH * NEW / seconds
        print(f"{name:<18} {seconds:8.2f} {tps:9.0f} {base_s / seconds:11.2f}x {same:>12}")
    print(
        f"\nMTP acceptance {stats.acceptance_rate:.3f} ({int(stats.accepted)} of "
        f"{int(stats.drafted)} drafts), {int(stats.steps)} verify steps for {NEW - 1} tokens "
        f"per row; speed-up over cached greedy {base_s / rows['MTP speculative'][0]:.2f}x"
    )
    cache_table()
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f}")


if __name__ == "__main__":
    main()
