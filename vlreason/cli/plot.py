"""``vlreason plot RUN_DIR``: draw a run's training curves from metrics.jsonl to a PNG."""

from __future__ import annotations

import argparse
import sys

HELP = "draw a run's training curves -> PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="run directory holding metrics.jsonl (or the metrics.jsonl file)",
    )
    parser.add_argument(
        "--out", metavar="FILE.png", default=None, help="output image (default: RUN_DIR/curves.png)"
    )
    parser.add_argument(
        "--keys",
        metavar="K1,K2",
        default=None,
        help="comma-separated metrics, one panel each ('time' = stacked time "
        "split); default: reward, loss, kl, completion length, lr, time",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.6,
        metavar="W",
        help="moving-average weight in [0, 1) drawn over the raw points; 0 disables (default: 0.6)",
    )


def run(args: argparse.Namespace) -> int:
    from vlreason.outputs import OutputPathError
    from vlreason.plotting import plot_run

    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        out = plot_run(args.run_dir, args.out, keys=keys, smooth=args.smooth)
    except OutputPathError as err:  # checked before drawing
        print(f"vlreason plot: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"vlreason plot: error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0
