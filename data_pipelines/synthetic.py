"""Synthetic visual tasks written as canonical rows (PNG bytes), seeded and deterministic.

Each generator ``make_<task>(n, seed, ...)`` returns ``n`` canonical rows (see
:mod:`vlreason.data.schema`). Row ``i`` depends only on ``(task, seed, i)``: the same
arguments give byte-identical PNGs, and the first rows of a larger ``n`` equal a
smaller ``n``'s. Every row has a ``solution`` in the Vision-R1 format
``<think>...</think><answer>ANSWER</answer>`` for supervised cold start, and a box in
``boxes`` (the evidence region). Texts are short with a small vocabulary, so a tiny
byte-level BPE tokenizer trained on them stays small.

Tasks (``TASKS``):

- ``color``: one large shape; "What colour is the shape?" -> red|green|blue|yellow.
  The easiest task, used by learning checks on a very small model.
- ``counting``: 1..max_count separated shapes; "How many shapes are there?" -> "3".
- ``fine_detail``: a small coloured mark in a large grey cluttered image; its colour.
  Answerable from a crop of the box, hard at a low pixel budget.
- ``multiple_choice``: one shape; colour or shape question with options A-D listed in
  the question, ``choices`` holding the option texts, answer a letter.

Command line: ``python -m data_pipelines.synthetic TASK --n N --seed S --out DIR``.
"""

from __future__ import annotations

import argparse
import io
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlreason.data.schema import canonical_row, save_canonical

# Well separated, saturated colours; clutter and backgrounds are grey (R == G == B).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
LETTERS = "ABCD"

Box = list[int]


# ----------------------------------------------------------------------------- helpers


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    """The generator for row ``index`` of ``task``: independent of ``n`` and other rows."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([zlib.crc32(task.encode()), seed, index])


def _png(img: Image.Image) -> bytes:
    """PNG bytes with no metadata (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _grey(level: int) -> tuple[int, int, int]:
    return (level, level, level)


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, box: Box, fill: tuple[int, int, int]
) -> None:
    """Draw a filled ``kind`` inscribed in ``box`` = [x0, y0, x1, y1] (x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    xa, ya = x1 - 1, y1 - 1  # PIL coordinates are inclusive
    cx, cy = (x0 + xa) / 2, (y0 + ya) / 2
    if kind == "circle":
        draw.ellipse([x0, y0, xa, ya], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, xa, ya], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (xa, ya), (x0, ya)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (xa, cy), (cx, ya), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def _place(rng: np.random.Generator, lo: int, hi: int, side: int) -> int:
    """A start coordinate so that ``[start, start + side)`` lies in ``[lo, hi)``."""
    return int(rng.integers(lo, max(lo, hi - side) + 1))


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _solution(thought: str, answer: str) -> str:
    return f"<think>{thought}</think><answer>{answer}</answer>"


def _where(box: Box, size: int) -> str:
    """Where a box is, in words: "at the top left", "in the middle", "at the bottom right"..."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / size))]
    col = ("left", "middle", "right")[min(2, int(3 * cx / size))]
    return "in the middle" if row == col == "middle" else f"at the {row} {col}"


def _one_shape_image(
    rng: np.random.Generator, size: int
) -> tuple[Image.Image, str, str, Box]:
    """A light grey background with one large shape: (image, colour, kind, box)."""
    colour, kind = _choice(rng, list(COLOURS)), _choice(rng, SHAPES)
    side = int(rng.integers(int(0.4 * size), int(0.7 * size) + 1))
    x0, y0 = _place(rng, 0, size, side), _place(rng, 0, size, side)
    box = [x0, y0, x0 + side, y0 + side]
    img = Image.new("RGB", (size, size), _grey(int(rng.integers(225, 256))))
    _draw_shape(ImageDraw.Draw(img), kind, box, COLOURS[colour])
    return img, colour, kind, box


def _row(
    task: str, seed: int, i: int, img: Image.Image, question: str, answer: str,
    thought: str, boxes: list[Box], meta: dict[str, Any], choices: list[str] | None = None,
) -> dict[str, Any]:
    return canonical_row(
        id=f"{task}-s{seed}-{i:05d}",
        images=[_png(img)],
        question=question,
        answer=answer,
        source=f"synthetic/{task}",
        boxes=boxes,
        choices=choices,
        solution=_solution(thought, answer),
        meta={"task": task, "seed": seed, "index": i, **meta},
    )


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


# ------------------------------------------------------------------------------ tasks


def make_color(n: int, seed: int, size: int = 112) -> list[dict[str, Any]]:
    """One large shape in one of 4 colours; "What colour is the shape?" -> colour name."""
    _check_n(n)
    rows = []
    for i in range(n):
        rng = _rng("color", seed, i)
        img, colour, kind, box = _one_shape_image(rng, size)
        rows.append(_row(
            "color", seed, i, img, "What colour is the shape?", colour,
            f"I see one shape. It is a {colour} {kind}.", [box],
            {"colour": colour, "shape": kind},
        ))
    return rows


def _count_phrase(items: list[str]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def make_counting(
    n: int, seed: int, size: int = 112, max_count: int = 4
) -> list[dict[str, Any]]:
    """1..``max_count`` separated coloured shapes; "How many shapes are there?" -> "3".

    Shapes sit in distinct cells of a grid (so they never touch); the solution lists them
    in reading order. ``boxes[0]`` is the union of all shapes (the evidence region); the
    per-shape boxes are in ``meta``.
    """
    _check_n(n)
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    grid = math.isqrt(max_count - 1) + 2  # e.g. 3x3 cells for up to 4 shapes
    cell = size // grid
    if cell < 12:
        raise ValueError(f"size {size} is too small for max_count {max_count}")
    rows = []
    for i in range(n):
        rng = _rng("counting", seed, i)
        count = int(rng.integers(1, max_count + 1))
        cells = sorted(rng.choice(grid * grid, size=count, replace=False).tolist())
        img = Image.new("RGB", (size, size), _grey(int(rng.integers(225, 256))))
        draw = ImageDraw.Draw(img)
        shapes = []
        for c in cells:
            gy, gx = divmod(c, grid)
            side = int(rng.integers(max(6, cell * 2 // 5), cell - 3))
            x0 = _place(rng, gx * cell + 2, (gx + 1) * cell - 1, side)
            y0 = _place(rng, gy * cell + 2, (gy + 1) * cell - 1, side)
            colour, kind = _choice(rng, list(COLOURS)), _choice(rng, SHAPES)
            box = [x0, y0, x0 + side, y0 + side]
            _draw_shape(draw, kind, box, COLOURS[colour])
            shapes.append({"colour": colour, "shape": kind, "box": box})
        union = [
            min(s["box"][0] for s in shapes), min(s["box"][1] for s in shapes),
            max(s["box"][2] for s in shapes), max(s["box"][3] for s in shapes),
        ]
        listed = _count_phrase([f"a {s['colour']} {s['shape']}" for s in shapes])
        total = "there is 1 shape" if count == 1 else f"there are {count} shapes"
        rows.append(_row(
            "counting", seed, i, img, "How many shapes are there?", str(count),
            f"I see {listed}. So {total}.", [union], {"shapes": shapes},
        ))
    return rows


def make_fine_detail(
    n: int, seed: int, size: int = 448, marker: int = 8
) -> list[dict[str, Any]]:
    """A ``marker``-px coloured square in a large grey cluttered image; its colour.

    Everything except the mark is grey (R == G == B), so the answer is the only colour
    in the image. ``boxes[0]`` is the mark. At a low pixel budget the mark shrinks to a
    pixel or two; a crop of the box answers it easily.
    """
    _check_n(n)
    if not 1 <= marker <= size // 4:
        raise ValueError(f"marker must be in [1, size/4], got {marker} for size {size}")
    rows = []
    for i in range(n):
        rng = _rng("fine_detail", seed, i)
        img = Image.new("RGB", (size, size), _grey(int(rng.integers(170, 231))))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(12, 31))):  # grey clutter, overlapping freely
            side = int(rng.integers(max(4, size // 20), max(5, size // 5)))
            x0, y0 = _place(rng, 0, size, side), _place(rng, 0, size, side)
            level = int(rng.integers(90, 246))
            _draw_shape(draw, _choice(rng, SHAPES), [x0, y0, x0 + side, y0 + side], _grey(level))
        colour = _choice(rng, list(COLOURS))
        x0 = _place(rng, marker, size - marker, marker)
        y0 = _place(rng, marker, size - marker, marker)
        box = [x0, y0, x0 + marker, y0 + marker]
        draw.rectangle([x0, y0, x0 + marker - 1, y0 + marker - 1], fill=COLOURS[colour])
        where = _where(box, size)
        rows.append(_row(
            "fine_detail", seed, i, img, "What colour is the small mark?", colour,
            f"I look for the small mark. It is {where}. It is {colour}.", [box],
            {"colour": colour, "marker": marker, "where": where},
        ))
    return rows


def make_multiple_choice(n: int, seed: int, size: int = 112) -> list[dict[str, Any]]:
    """One shape; a colour or shape question with options A-D; the answer is a letter.

    ``choices`` holds the option texts in letter order; the question lists them as
    ``A. red`` lines.
    """
    _check_n(n)
    rows = []
    for i in range(n):
        rng = _rng("multiple_choice", seed, i)
        img, colour, kind, box = _one_shape_image(rng, size)
        asks_colour = bool(rng.integers(2))
        pool, truth = (list(COLOURS), colour) if asks_colour else (list(SHAPES), kind)
        options = [pool[j] for j in rng.permutation(len(pool))]
        letter = LETTERS[options.index(truth)]
        stem = "What colour is the shape?" if asks_colour else "What shape is it?"
        question = "\n".join([stem] + [f"{L}. {o}" for L, o in zip(LETTERS, options)])
        what = "colour" if asks_colour else "shape"
        rows.append(_row(
            "multiple_choice", seed, i, img, question, letter,
            f"I see a {colour} {kind}. The {what} {truth} is option {letter}.", [box],
            {"colour": colour, "shape": kind, "asks": what}, choices=options,
        ))
    return rows


TASKS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "color": make_color,
    "counting": make_counting,
    "fine_detail": make_fine_detail,
    "multiple_choice": make_multiple_choice,
}


def build_dataset(
    task: str, n: int, seed: int, out_dir: str | Path, **options: Any
) -> Path:
    """Generate ``n`` rows of ``task`` (options go to its generator) and save them."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {sorted(TASKS)}")
    return save_canonical(TASKS[task](n, seed, **options), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic canonical dataset.")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--n", type=int, default=256, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--out", required=True, help="output dataset folder")
    args = parser.parse_args(argv)
    options = {} if args.size is None else {"size": args.size}
    out = build_dataset(args.task, args.n, args.seed, args.out, **options)
    print(f"wrote {args.n} {args.task} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
