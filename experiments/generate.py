"""generate: complete prompts with a trained run's latest checkpoint and tokenizer.

    python -m experiments generate --ckpt runs/pretrain-tiny --prompt "def main(" \\
        --prompt "12 + 35 =" --max-new-tokens 64 [--temperature 0.8 --top-p 0.95 \\
        --num-samples 4 --seed 0] [--speculative]

Greedy by default. Generation stops at the tokenizer's end-of-sentence token (--no-stop to
run to --max-new-tokens). --speculative decodes greedily with the MTP module as the draft and
prints its acceptance rate. About 20 s for pretrain-tiny on 2 CPU cores, most of it
compilation.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

import model
from model import FinishReason
from train.run import load_run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="a run directory (e.g. runs/pretrain-tiny)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", action="store_true", help="greedy with MTP drafts")
    parser.add_argument("--no-stop", action="store_true", help="ignore end-of-sentence")
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        run = load_run(args.ckpt)
        tok = run.tokenizer
        prompts = [tok.encode(p) for p in args.prompt]
        stops = () if args.no_stop else (tok.eos_id,)
        start = time.perf_counter()
        if args.speculative:
            if args.temperature != 0 or args.num_samples != 1:
                raise ValueError("--speculative is greedy: drop --temperature / --num-samples")
            out, stats = model.generate_speculative(
                run.cfg,
                run.variables,
                prompts,
                max_new_tokens=args.max_new_tokens,
                stop_tokens=stops,
            )
        else:
            out = model.generate(
                run.cfg,
                run.variables,
                prompts,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                stop_tokens=stops,
                num_samples=args.num_samples,
                rng=jax.random.key(args.seed),
            )
        completions = out.completions()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    seconds = time.perf_counter() - start
    print(f"{args.ckpt} at step {run.step}")
    for row, completion in enumerate(completions):
        prompt = args.prompt[row // args.num_samples]
        reason = FinishReason(int(out.finish_reason[row])).name.lower()
        print(f"--- prompt {row // args.num_samples} sample {row % args.num_samples} ({reason})")
        print(prompt + tok.decode(completion))
    tokens = sum(len(c) for c in completions)
    print(f"--- {tokens} tokens in {seconds:.1f} s including compilation")
    if args.speculative:
        print(f"MTP acceptance {stats.acceptance_rate:.3f} over {int(stats.drafted)} drafts")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
