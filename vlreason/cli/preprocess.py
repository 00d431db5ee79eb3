"""``vlreason preprocess SOURCE --out DIR``: raw data -> canonical dataset + report.json.

Exit status 0 when at least one row was kept (rejected rows are listed in the report);
1 on a fatal error (missing source, strict mode hit a bad row, every row rejected), with
the reason on stderr; 2 when ``--out`` cannot be written (checked before any work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "raw data -> canonical dataset + report.json"

# The offline tool this verb fronts, resolved by name when the verb runs: data_pipelines
# sits beside vlreason (it writes the schema vlreason.data reads) and imports vlreason,
# so no module of vlreason imports it statically (tests/test_layers.py).
PIPELINE = "data_pipelines.preprocess"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlreason.data.images import DEFAULT_MAX_PIXELS

    parser.add_argument(
        "source", metavar="SOURCE", help="JSONL file, HF dataset/parquet, or image folder"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset folder")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", "jsonl", "hf", "folder"),
        help="input format (default: guessed from SOURCE)",
    )
    parser.add_argument("--image-root", metavar="DIR", help="folder image paths are relative to")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"reject images over N pixels (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--min-side",
        type=int,
        default=8,
        metavar="N",
        help="reject images with a side under N (default 8)",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row")
    parser.add_argument(
        "--num-proc", type=int, default=1, metavar="N", help="processes decoding images"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--source-name", metavar="NAME", help="`source` column and id prefix")
    parser.add_argument("--labels", metavar="FILE", help="labels file for --format folder")
    parser.add_argument(
        "--image-column",
        metavar="NAME",
        help="column holding the image(s) (default: image, else images)",
    )
    parser.add_argument(
        "--question-column", metavar="NAME", help="column holding the question (default: question, else problem)"
    )
    parser.add_argument(
        "--answer-column", metavar="NAME", help="column holding the answer (default: answer, else solution)"
    )
    parser.add_argument("--question", metavar="TEXT", help="question for rows that have none")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from vlreason.outputs import OutputPathError, prepare_output
    from vlreason.registry import resolve_entry_point

    pipeline = resolve_entry_point(PIPELINE)

    out = Path(args.out)
    existed = out.exists()
    try:
        prepare_output(out, is_dir=True)
    except OutputPathError as err:
        print(f"vlreason preprocess: error: {err}", file=sys.stderr)
        return 2
    try:
        report = pipeline.preprocess(
            args.source,
            args.out,
            fmt=args.format,
            image_root=args.image_root,
            max_pixels=args.max_pixels,
            min_side=args.min_side,
            strict=args.strict,
            num_proc=args.num_proc,
            source_name=args.source_name,
            labels_file=args.labels,
            image_column=args.image_column,
            question_column=args.question_column,
            answer_column=args.answer_column,
            question=args.question,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
        )
    except (pipeline.PreprocessError, OSError) as err:  # expected failures: no traceback
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the empty folder prepare_output made; nothing was written
        print(f"vlreason preprocess: error: {err}", file=sys.stderr)
        return 1

    print(f"kept {report.kept} of {report.total} rows -> {args.out}")
    if report.rejected:
        print(f"rejected {report.rejected}:")
        for reason, count in report.rejected_by_reason.items():
            print(f"  {count:>6}  {reason}")
    print(f"report: {Path(args.out) / pipeline.REPORT_NAME}")
    if report.kept == 0:
        print("vlreason preprocess: error: no row was kept; see the report", file=sys.stderr)
        return 1
    return 0
