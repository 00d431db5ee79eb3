"""Build the bundled demo dataset in ``assets/demo/{train,eval}`` (plus its README).

Run: ``python -m data_pipelines.build_demo_data [--out assets/demo]``. Deterministic:
rerunning gives the same rows. The mix is mostly ``color`` and ``counting`` at 112 px
(easy enough for a tiny model to learn on CPU), some ``multiple_choice``, and a few
``fine_detail`` rows at 224 px with boxes (for crop views), to keep the data small.
Eval rows use other seeds than train rows, and any eval row whose image and question
equal a train row's is dropped.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.synthetic import TASKS
from vlreason.data.schema import save_canonical
from vlreason.paths import assets_dir

# split -> (task, rows, options); seeds are per split (train 0, eval 1).
MIX: dict[str, list[tuple[str, int, dict[str, Any]]]] = {
    "train": [
        ("color", 104, {"size": 112}),
        ("counting", 104, {"size": 112, "max_count": 4}),
        ("multiple_choice", 24, {"size": 112}),
        ("fine_detail", 24, {"size": 224, "marker": 8}),
    ],
    "eval": [
        ("color", 24, {"size": 112}),
        ("counting", 24, {"size": 112, "max_count": 4}),
        ("multiple_choice", 8, {"size": 112}),
        ("fine_detail", 8, {"size": 224, "marker": 8}),
    ],
}
SEEDS = {"train": 0, "eval": 1}

README = """\
# Bundled demo dataset

Synthetic canonical datasets (`datasets.save_to_disk` folders, schema in
`vlreason/data/schema.py`) used by `vlreason train RECIPE` with no config, the demos and
the tests. Made by `python -m data_pipelines.build_demo_data` (deterministic; generators
in `data_pipelines/synthetic.py`); rerun it after changing a generator.

| split | rows | mix (task x rows, image size) | seed |
|---|---|---|---|
{table}

Tasks: `color` (one large shape, "What colour is the shape?"), `counting` ("How many
shapes are there?", 1-4 shapes), `multiple_choice` (colour or shape, options A-D, answer a
letter), `fine_detail` (an 8-px coloured mark in a grey cluttered image, its box in
`boxes`). Every row has a `<think>...</think><answer>...</answer>` `solution` for cold start
and a box. Rows are shuffled; eval rows never repeat a train row's image and question.
Load with `vlreason.paths.demo_data("train")`.
"""


def _key(row: dict[str, Any]) -> str:
    return hashlib.sha256(row["images"][0] + row["question"].encode()).hexdigest()


def build_split(split: str, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """The shuffled rows of ``split``; rows whose image+question key is in ``exclude`` are
    replaced by further rows of the same task."""
    exclude = exclude or set()
    seed = SEEDS[split]
    rows: list[dict[str, Any]] = []
    for task, n, options in MIX[split]:
        extra = n
        while True:  # generate a margin, keep the first n rows not in ``exclude``
            kept = [r for r in TASKS[task](n + extra, seed, **options) if _key(r) not in exclude]
            if len(kept) >= n:
                break
            extra *= 2
        rows.extend(kept[:n])
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def build_demo(out: Path) -> dict[str, int]:
    """Write ``out/train``, ``out/eval`` and ``out/README.md``; return rows per split."""
    train = build_split("train")
    evaluation = build_split("eval", exclude={_key(r) for r in train})
    save_canonical(train, out / "train")
    save_canonical(evaluation, out / "eval")
    table = "\n".join(
        f"| {split} | {sum(n for _, n, _ in MIX[split])} | "
        + ", ".join(f"{t} x{n} ({o['size']} px)" for t, n, o in MIX[split])
        + f" | {SEEDS[split]} |"
        for split in MIX
    )
    (out / "README.md").write_text(README.format(table=table))
    return {"train": len(train), "eval": len(evaluation)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=assets_dir() / "demo")
    args = parser.parse_args(argv)
    counts = build_demo(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {counts} rows to {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
