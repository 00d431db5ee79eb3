"""``vlreason preview VIEW --data DIR --out FILE.png``: original and image view side by side.

One line per dataset row: the original image (left) and the view a recipe feeds the
model (right), each with a caption. Views are resized to the pixel budget given by
``--min-pixels`` / ``--max-pixels`` / ``--factor`` (the same values as a run's
``rollout.min_pixels`` / ``rollout.max_pixels``), so the right column is what the model
sees. ``crop`` and ``box`` use rows that have boxes.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlreason.data.images import decode_image

HELP = "draw original and image view side by side -> PNG"

PAD = 8  # pixels around and between cells
CAPTION = 16  # caption band height above each line of cells
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlreason.views import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    parser.add_argument("view", metavar="VIEW", help="resize | crop | box | mask | noise")
    parser.add_argument("--data", required=True, type=Path, help="canonical dataset folder")
    parser.add_argument("--out", required=True, type=Path, help="output PNG file")
    parser.add_argument("--rows", type=int, default=4, help="dataset rows to draw (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="view seed; row i uses seed + i")
    parser.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS,
                        help=f"pixel budget minimum area (default {DEFAULT_MIN_PIXELS})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"pixel budget maximum area (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--factor", type=int, default=28,
                        help="sides are multiples of this (28 Qwen2/2.5-VL, 32 Qwen3-VL)")
    parser.add_argument("--p", type=float, default=0.6, help="mask: patch probability")
    parser.add_argument("--t", type=int, default=500, help="noise: timestep of 1000")
    parser.add_argument("--cell", type=int, default=224, help="display cell side in pixels")


def layout_size(n_rows: int, cell: int) -> tuple[int, int]:
    """``(width, height)`` of the preview grid for ``n_rows`` lines of two cells."""
    return 2 * cell + 3 * PAD, PAD + n_rows * (CAPTION + cell + PAD)


def _fit(img: Image.Image, cell: int) -> Image.Image:
    """Scale ``img`` to fit a ``cell`` square, keeping its aspect ratio.

    Enlarging uses nearest-neighbour so patches and pixels stay crisp.
    """
    scale = min(cell / img.width, cell / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    method = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return img.convert("RGB").resize(size, method)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError):  # old Pillow or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` shortened with "..." to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_grid(
    lines: list[tuple[Image.Image, str, Image.Image, str]], cell: int = 224
) -> Image.Image:
    """Draw ``(left, left_caption, right, right_caption)`` lines as one grid image."""
    grid = Image.new("RGB", layout_size(len(lines), cell), BACKGROUND)
    draw, font = ImageDraw.Draw(grid), _font()
    for i, (left, left_caption, right, right_caption) in enumerate(lines):
        top = PAD + i * (CAPTION + cell + PAD)
        for j, (img, caption) in enumerate(((left, left_caption), (right, right_caption))):
            x = PAD + j * (cell + PAD)
            draw.text((x, top + 2), _clip_text(draw, caption, font, cell), fill=TEXT, font=font)
            tile = _fit(img, cell)
            grid.paste(tile, (x + (cell - tile.width) // 2, top + CAPTION + (cell - tile.height) // 2))
    return grid


def _view_options(view_fn: Any, available: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``available`` options that ``view_fn`` takes as keywords."""
    params = inspect.signature(view_fn).parameters
    return {k: v for k, v in available.items() if k in params}


def _describe(view: str, options: dict[str, Any]) -> str:
    extra = " ".join(f"{k}={options[k]}" for k in ("p", "t") if k in options)
    return f"{view} {extra}".strip()


def _error(message: str) -> int:
    print(f"vlreason preview: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from vlreason.data.schema import load_canonical
    from vlreason.outputs import OutputPathError, prepare_output
    from vlreason.views import BOX_VIEWS, VIEWS, PixelBudget

    if args.view not in VIEWS:
        return _error(f"unknown view {args.view!r}; valid views: {', '.join(sorted(VIEWS))}")
    if args.rows < 1 or args.cell < 16:
        return _error("--rows must be >= 1 and --cell >= 16")
    if not (0.0 <= args.p <= 1.0 and 0 <= args.t <= 1000):
        return _error(f"--p must be in [0, 1] and --t in [0, 1000], got {args.p}, {args.t}")
    try:
        budget = PixelBudget(args.min_pixels, args.max_pixels, args.factor)
        ds = load_canonical(args.data)
        prepare_output(args.out)  # before any view is drawn
    except (FileNotFoundError, ValueError, OutputPathError) as err:
        return _error(str(err))

    view_fn = VIEWS[args.view]
    options = _view_options(view_fn, {"budget": budget, "p": args.p, "t": args.t})
    needs_box = args.view in BOX_VIEWS
    lines = []
    for index, row in enumerate(ds):
        if len(lines) == args.rows:
            break
        if not row["images"] or (needs_box and not row.get("boxes")):
            continue
        img = decode_image(row["images"][0], max_pixels=None)  # the strict decoder of vlreason.data
        out = view_fn(img, row, args.seed + index, **options)
        lines.append((
            img, f"{row['id']}  original {img.width}x{img.height}",
            out, f"{_describe(args.view, options)}  {out.width}x{out.height}",
        ))
    if not lines:
        what = "an image and a box" if needs_box else "an image"
        return _error(f"no row in {args.data} has {what}; view {args.view!r} needs it")

    render_grid(lines, cell=args.cell).save(args.out)
    print(f"wrote {args.out} ({len(lines)} rows, view {args.view!r})")
    return 0
