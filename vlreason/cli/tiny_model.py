"""``vlreason tiny-model OUT_DIR [--family ...] [--vocab-size N] [--seed S]``."""

from __future__ import annotations

import argparse
import sys

from vlreason.models.tiny import FAMILIES, TinySpec, build_tiny_model, family_available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="directory to write the checkpoint to (replaced if it exists)")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl", help="model family (default qwen2_5_vl)")
    parser.add_argument("--vocab-size", type=int, default=TinySpec.vocab_size,
                        help="model vocabulary; 151936 gives the real Qwen size for memory benchmarks")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (same seed, same bytes)")


def run(args: argparse.Namespace) -> int:
    ok, why = family_available(args.family)
    if not ok:
        print(f"vlreason tiny-model: skipped: {why}", file=sys.stderr)
        return 1
    spec = TinySpec(family=args.family, vocab_size=args.vocab_size, seed=args.seed)
    try:
        path = build_tiny_model(args.out_dir, spec)
    except ValueError as err:
        print(f"vlreason tiny-model: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0
